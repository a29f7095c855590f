"""What the real KServe controller (v0.20.0's cmd/manager, run by hack/placement.sh) makes of the
InferenceServices the operator writes: its admission webhooks accept them, and what it creates from them
at each canary step.

Standard mode: the Deployments and Services KServe writes, with kube-controller-manager's deployment and
replicaset controllers and kwok playing the predictor pods (they never run), and the operator's weighted
Gateway API HTTPRoute beside them: the InferenceService is labelled cluster-local, so KServe writes no
HTTPRoute of its own (and needs no gateway controller to report IngressReady; none runs here).

Knative mode: only Knative Serving's CRDs are installed (its controller does not run), so the test plays
Knative's status on the Knative Service KServe writes (revisions created, ready, the traffic served as the
spec asks); what it checks is KServe's own output, the Service's spec.traffic.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from _canary_support import Load
from _operator_support import Cluster, OperatorProcess, deployment_spec, train, wait_for, wait_until
from kubernetes import client
from kubernetes.client.rest import ApiException

from conveyor.operator.modeldeployment.build import (
    build_experiment_service,
    build_inference_service,
    build_shadow_service,
)
from conveyor.operator.modeldeployment.validate import validate_deployment
from conveyor.runtime.spec import ModelDeploymentSpec

pytestmark = pytest.mark.placement

MDEP = "modeldeployments"
SAMPLES = sorted(
    (Path(__file__).resolve().parents[2] / "manifests" / "samples").glob("modeldeployment-*.yaml")
)
GATEWAY = ("gateway.networking.k8s.io", "v1", "httproutes")
KNATIVE = ("serving.knative.dev", "v1", "services")
ROUTE = "fraud-traffic"  # the operator's weighted HTTPRoute (operator/modeldeployment/route.py)
KSERVE_GATEWAY = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "kserve",
                  "name": "kserve-ingress-gateway"}  # KServe's default kserveIngressGateway
NOW = "2026-01-01T00:00:00Z"

ANALYSIS = {
    "window": "10s",
    "minRequests": 5,
    "minSuccessRate": 0.95,
    "failureLimit": 0,
    "consecutiveErrorLimit": 3,
}
MIN_REPLICAS, MAX_REPLICAS = 4, 8
STANDARD_STEPS = [25, 50, 100]


@pytest.fixture
def registry(tmp_path: Path, restricted_namespace: str) -> str:
    uri = f"file://{tmp_path}/registry"
    for run in (1, 2):  # v1 and v2, as two training runs would have committed them
        train(
            uri,
            "fraud",
            pipeline="offline",
            namespace=restricted_namespace,
            run=run,
            accuracy=0.9 + run / 100,
        )
    return uri


@pytest.fixture
def analysing_operator(
    placement_kubeconfig: str, restricted_namespace: str, prometheus: Any
) -> Iterator[OperatorProcess]:
    load = Load(prometheus, restricted_namespace, versions=("v1", "v2"))
    op = OperatorProcess(
        placement_kubeconfig, restricted_namespace, "--prometheus-url", prometheus.url
    ).start()
    try:
        yield op
    finally:
        op.stop()
        load.stop()
        print(op.logs())


# -- what KServe wrote ----------------------------------------------------------------------------------


def _routes(cluster: Cluster) -> dict[str, dict[str, Any]]:
    items = cluster.custom.list_namespaced_custom_object(*GATEWAY[:2], cluster.ns, GATEWAY[2])["items"]
    return {r["metadata"]["name"]: r for r in items}


def _backends(route: dict[str, Any]) -> list[tuple[str, int | None]]:
    """Every rule's backends as (Service, weight)."""
    return [
        (b["name"], b.get("weight")) for rule in route["spec"]["rules"] for b in rule.get("backendRefs") or []
    ]


def _predictor_deployments(cluster: Cluster, isvc: str) -> dict[str, tuple[int, int]]:
    """KServe's predictor Deployments: name -> (spec.replicas, status.availableReplicas)."""
    items = (
        client.AppsV1Api(cluster.core.api_client)
        .list_namespaced_deployment(cluster.ns, label_selector=f"serving.kserve.io/inferenceservice={isvc}")
        .items
    )
    return {d.metadata.name: (d.spec.replicas, d.status.available_replicas or 0) for d in items}


def _isvc_condition(isvc: dict[str, Any], type_: str) -> str | None:
    for c in (isvc.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"]
    return None


# -- the controllers that do not run here, played -------------------------------------------------------


class KnativePlayer:
    """Knative's status for the Knative Services KServe writes (its controller does not run here): a new
    revision for each new template, ready at once, serving the spec's traffic block as written."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.templates: dict[str, tuple[str, str]] = {}  # service -> (template, its latest revision)

    def play(self, name: str) -> dict[str, Any]:
        c = self.cluster
        ksvc = c.custom.get_namespaced_custom_object(*KNATIVE[:2], c.ns, KNATIVE[2], name)
        template = json.dumps(ksvc["spec"]["template"], sort_keys=True)
        seen, latest = self.templates.get(name, ("", f"{name}-00000"))
        if template != seen:
            latest = f"{name}-{int(latest.rsplit('-', 1)[1]) + 1:05d}"
            self.templates[name] = (template, latest)
        traffic = [
            {
                "revisionName": t.get("revisionName") or latest,
                "percent": t["percent"],
                "latestRevision": bool(t.get("latestRevision")),
                **({"tag": t["tag"]} if t.get("tag") else {}),
            }
            for t in ksvc["spec"]["traffic"]
        ]
        ready = [
            {"type": t, "status": "True", "lastTransitionTime": NOW}
            for t in ("ConfigurationsReady", "RoutesReady", "Ready")
        ]
        return c.custom.patch_namespaced_custom_object_status(
            *KNATIVE[:2],
            c.ns,
            KNATIVE[2],
            name,
            {
                "status": {
                    "observedGeneration": ksvc["metadata"]["generation"],
                    "conditions": ready,
                    "latestCreatedRevisionName": latest,
                    "latestReadyRevisionName": latest,
                    "url": f"http://{name}.{c.ns}.example.com",
                    "address": {"url": f"http://{name}.{c.ns}.svc"},
                    "traffic": traffic,
                }
            },
        )


# -- Standard mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_replicas", [MIN_REPLICAS, 1], ids=["minReplicas4", "minReplicas1"])
def test_standard_canary_steps_on_the_real_kserve(
    placement_cluster: Cluster, analysing_operator: OperatorProcess, registry: str, min_replicas: int
) -> None:
    """At each step of a Standard-mode canary (analysed by a real Prometheus, promoted by the operator),
    what the real KServe v0.20.0 makes of our `spec.canary[]`, and the route the operator adds:

    - a Deployment, Service and HPA per version: the canary's HPA pinned at its fixed share of
      minReplicas (min = max = ceil(min x weight / 100)), the stable one's minimum lowered by as many
      (at least 1); kube-controller-manager's HPA controller holds each at its minimum (no metrics
      server runs, so nothing scales on load and the stable Deployment keeps the replicas it had);
    - its status echoes the canary's trafficPercent (`canaryStatuses`), which the operator reads;
    - KServe writes no HTTPRoute (its own would have ONE backend, the stable predictor's Service, at
      every step): the operator labels the InferenceService `networking.kserve.io/visibility:
      cluster-local`, and KServe still reports its url and IngressReady;
    - the operator's HTTPRoute `fraud-traffic`, on KServe's gateway for the host of that url, carries the
      stable predictor's Service at 100-w and the canary's at w at each step, each a Service KServe
      created; after promotion (predictor.name becomes the canary's, the canary entry goes, KServe
      deletes the old predictor's Deployment and Service) one backend, the new predictor's, at 100.

    Also at minReplicas 1, where the canary is one replica at every step (from 25% to 50% nothing of
    either Deployment changes): the operator still sees each step taken, from KServe's `canaryStatuses`
    (`plan.spec_observed`; the observedGeneration KServe reports in this mode is a Deployment's)."""
    cluster = placement_cluster
    spec = deployment_spec(
        registry,
        "v1",
        predictor={"resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
        autoscaling={"minReplicas": min_replicas, "maxReplicas": MAX_REPLICAS, "metric": "cpu", "target": 70},
        rollout={"mode": "Standard", "steps": STANDARD_STEPS, "interval": "5s", "analysis": ANALYSIS},
    )
    cluster.create(MDEP, "fraud", spec)

    def services() -> set[str]:
        return {s.metadata.name for s in cluster.core.list_namespaced_service(cluster.ns).items}

    def settled(version: str) -> dict[str, Any] | None:
        status = cluster.status(MDEP, "fraud")
        isvc = cluster.isvc("fraud")
        if (
            status.get("stableVersion") == version
            and status.get("rolloutPhase") == "Stable"
            and not status.get("canaryVersion")
            and _isvc_condition(isvc, "Ready") == "True"
            and _isvc_condition(isvc, "IngressReady") == "True"
            and _predictor_deployments(cluster, "fraud")
            == {f"fraud-{version}-predictor": (min_replicas,) * 2}
            and _route_backends(cluster) == {ROUTE: [(f"fraud-{version}-predictor", 100)]}
        ):
            return status
        return None

    try:
        wait_for("v1 served through the real KServe and the operator's route", lambda: settled("v1"), timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_snapshot(cluster)}") from None
    assert _hpas(cluster) == {"fraud-v1-predictor": (min_replicas, MAX_REPLICAS)}
    route = _routes(cluster)[ROUTE]
    host = urlsplit(cluster.isvc("fraud")["status"]["url"]).hostname
    assert route["spec"]["hostnames"] == [host] and route["spec"]["parentRefs"] == [KSERVE_GATEWAY]
    assert [o["kind"] for o in route["metadata"]["ownerReferences"]] == ["ModelDeployment"]
    assert "fraud-v1-predictor" in services()

    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})
    for weight in STANDARD_STEPS:
        canary = math.ceil(min_replicas * weight / 100)
        split = [("fraud-v1-predictor", 100 - weight), ("fraud-v2-predictor", weight)]
        split = [b for b in split if b[1] > 0]

        hpas = {"fraud-v1-predictor": (max(1, min_replicas - canary), MAX_REPLICAS),
                "fraud-v2-predictor": (canary, canary)}
        # Each fact is recorded when a poll sees it while the spec asks for this step (it holds `interval`
        # at least): one poll need not catch them all at once (a loaded machine's polls take seconds).
        facts: dict[str, Any] = {}

        def at_step(weight: int = weight, canary: int = canary, split: list[Any] = split,
                    hpas: dict[str, Any] = hpas, facts: dict[str, Any] = facts) -> dict[str, Any] | None:
            isvc = cluster.isvc("fraud")
            if [c["trafficPercent"] for c in isvc["spec"].get("canary") or []] != [weight]:
                return None
            seen: dict[str, Any] = {
                "reported": [(e["name"], e["ready"], e["trafficPercent"])
                             for e in (isvc.get("status") or {}).get("canaryStatuses") or []],
                "route": _route_backends(cluster),  # the operator applies the weights once v2 is Ready
                "deployments": _predictor_deployments(cluster, "fraud"),
                "hpas": _hpas(cluster),
                "services": services(),
            }
            if [c["trafficPercent"] for c in cluster.isvc("fraud")["spec"].get("canary") or []] != [weight]:
                return None  # read after the step had passed
            expected = {
                # (KServe's status keeps the last canary for a moment after the promotion)
                "reported": lambda v: v == [("v2", True, weight)],
                # The gateway's only route for the model is the operator's, weighting Services KServe created.
                "route": lambda v: v == {ROUTE: split},
                "deployments": lambda v: v.get("fraud-v2-predictor") == (canary, canary)
                and v.get("fraud-v1-predictor", (0, 0))[0] >= max(1, min_replicas - canary),
                "hpas": lambda v: v == hpas,
                "services": lambda v: {"fraud-v1-predictor", "fraud-v2-predictor"} <= v,
            }
            for fact, value in seen.items():
                facts[f"last {fact}"] = value
                if expected[fact](value):
                    facts[fact] = value
            return facts if all(fact in facts for fact in expected) else None

        try:
            wait_for(f"KServe and the route at the {weight}% step", at_step, timeout=60, interval=0.3)
        except AssertionError as e:
            raise AssertionError(f"{e}\nseen at this step: {facts}\n{_snapshot(cluster)}") from None

    status = wait_for("v2 promoted", lambda: settled("v2"), timeout=60)
    assert [a["weight"] for a in status["analyses"]][-len(STANDARD_STEPS) :] == STANDARD_STEPS
    assert _route_backends(cluster) == {ROUTE: [("fraud-v2-predictor", 100)]}
    wait_until("the old predictor's Service deleted by KServe", services, lambda s: "fraud-v1-predictor" not in s,
               timeout=30)
    assert "fraud-v2-predictor" in services()


def test_standard_shadow_is_cluster_local_and_mirrored_to_kserves_address(
    placement_cluster: Cluster, placement_operator: OperatorProcess, registry: str
) -> None:
    """A Standard-mode shadow on the real KServe v0.20.0: the operator labels the `fraud-shadow`
    InferenceService cluster-local, so KServe writes no HTTPRoute for it (nothing exposes the shadow; the
    only route is the operator's, v1 at 100) and reports its cluster address (`status.address.url`, the
    shadow predictor Service's in-cluster name); the stable predictor's CONVEYOR_SHADOW_URL is that address."""
    cluster = placement_cluster
    spec = deployment_spec(
        registry,
        "v1",
        predictor={"resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
        autoscaling={"minReplicas": 1, "maxReplicas": 2, "metric": "cpu", "target": 70},
        # No Prometheus in this test: the analysis is an hour away; what is checked is the mirror's wiring.
        rollout={"mode": "Standard", "strategy": "shadow", "shadow": {"percent": 100}, "steps": [50, 100],
                 "interval": "1h"},
    )
    cluster.create(MDEP, "fraud", spec)
    wait_for(
        "v1 served through the operator's route",
        lambda: _route_backends(cluster) == {ROUTE: [("fraud-v1-predictor", 100)]}
        and _isvc_condition(cluster.isvc("fraud"), "Ready") == "True",
        timeout=90,
    )
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})

    def mirrored() -> tuple[dict[str, Any], str] | None:
        shadow = cluster.isvc("fraud-shadow")
        address = ((shadow.get("status") or {}).get("address") or {}).get("url")
        predictor = cluster.isvc("fraud")["spec"]["predictor"]
        env = {e["name"]: e.get("value") for e in predictor["containers"][0].get("env") or []}
        if address and _isvc_condition(shadow, "Ready") == "True" and env.get("CONVEYOR_SHADOW_URL") == address:
            return shadow, address
        return None

    try:
        shadow, address = wait_for("the stable predictor mirroring to the shadow's address", mirrored, timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_snapshot(cluster)}") from None
    assert shadow["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    assert address == f"http://fraud-shadow-v2-predictor.{cluster.ns}.svc.cluster.local"
    assert _isvc_condition(shadow, "IngressReady") == "True"  # KServe's ingress reconciler has run on it
    assert _route_backends(cluster) == {ROUTE: [("fraud-v1-predictor", 100)]}  # no route for the shadow
    status = wait_until(
        "the operator's status", lambda: cluster.status(MDEP, "fraud"), lambda s: (s.get("shadow") or {}).get("mirroring")
    )
    assert [(t["version"], t["percent"]) for t in status["traffic"]] == [("v1", 100)]


def _snapshot(cluster: Cluster) -> str:
    """What KServe and the operator show, for a failure's message."""
    isvc = cluster.isvc("fraud")
    status = cluster.status(MDEP, "fraud")
    return json.dumps(
        {
            "spec.canary": [
                (c["predictor"]["name"], c["trafficPercent"]) for c in isvc["spec"].get("canary") or []
            ],
            "kserve": {
                k: (isvc.get("status") or {}).get(k)
                for k in ("canaryStatuses", "conditions", "observedGeneration")
            },
            "deployments": _predictor_deployments(cluster, "fraud"),
            "hpas": _hpas(cluster),
            "routes": _route_backends(cluster),
            "labels": isvc["metadata"].get("labels"),
            "url": (isvc.get("status") or {}).get("url"),
            "operator": {
                k: status.get(k) for k in ("rolloutPhase", "canaryWeight", "analyses", "conditions")
            },
        },
        indent=1,
        default=str,
    )


def _route_backends(cluster: Cluster) -> dict[str, list[tuple[str, int | None]]]:
    """Each HTTPRoute in the namespace (KServe's would be there too) and its backends (Service, weight)."""
    return {name: _backends(route) for name, route in _routes(cluster).items()}


def _hpas(cluster: Cluster) -> dict[str, tuple[int, int]]:
    items = (
        client.AutoscalingV2Api(cluster.core.api_client)
        .list_namespaced_horizontal_pod_autoscaler(cluster.ns)
        .items
    )
    return {h.metadata.name: (h.spec.min_replicas, h.spec.max_replicas) for h in items}


# -- Knative mode ----------------------------------------------------------------------------------------


def test_knative_canary_percentage_reaches_the_knative_service(
    placement_kubeconfig: str, placement_cluster: Cluster, registry: str
) -> None:
    """Knative mode: the Knative Service the real KServe writes carries our canaryTrafficPercent in its
    traffic block (the latest revision at the canary's share, the last rolled-out one at the rest, tagged
    prev), and the operator reads the split back from KServe's status. Knative's controller does not run:
    the test plays its status on the Knative Service."""
    cluster = placement_cluster
    op = OperatorProcess(placement_kubeconfig, cluster.ns).start()
    try:
        cluster.create(
            MDEP,
            "fraud",
            deployment_spec(
                registry, "v1", rollout={"mode": "Knative", "steps": [30, 100], "interval": "1h"}
            ),
        )
        ksvc = wait_for("KServe's Knative Service", lambda: _ksvc(cluster))
        assert ksvc["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}]
        knative = KnativePlayer(cluster)
        knative.play("fraud-predictor")
        wait_for(
            "v1 Ready",
            lambda: (
                cluster.status(MDEP, "fraud").get("stableVersion") == "v1"
                and (cluster.condition(MDEP, "fraud", "Ready") or {}).get("status") == "True"
            ),
        )

        cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})
        ksvc = wait_until(
            "the canary's traffic block",
            lambda: _ksvc(cluster),
            lambda k: len(k["spec"]["traffic"]) == 2,
            timeout=30,
        )
        assert ksvc["spec"]["traffic"] == [
            {"latestRevision": True, "percent": 30},
            {"latestRevision": False, "percent": 70, "revisionName": "fraud-predictor-00001", "tag": "prev"},
        ]
        env = {e["name"]: e["value"] for e in ksvc["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["STORAGE_URI"] == f"{registry}/fraud/v2"
        knative.play("fraud-predictor")
        expected = {("v2", 30, "fraud-predictor-00002"), ("v1", 70, "fraud-predictor-00001")}
        wait_until(
            "the split read back from KServe's status",
            lambda: {
                (t["version"], t["percent"], t.get("revision"))
                for t in cluster.status(MDEP, "fraud")["traffic"]
            },
            lambda t: t == expected,
            timeout=30,
        )
    finally:
        op.stop()
        print(op.logs())


def _ksvc(cluster: Cluster) -> dict[str, Any]:
    return cluster.custom.get_namespaced_custom_object(
        *KNATIVE[:2], cluster.ns, KNATIVE[2], "fraud-predictor"
    )


# -- admission -------------------------------------------------------------------------------------------


def _variants(sample: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every InferenceService the operator can write for a sample: as written, and in the other KServe mode
    (Standard needs minReplicas >= 1 and metric cpu), stable alone, at each canary step, promoted, its
    shadow, and an A/B/N experiment."""
    manifest = yaml.safe_load(sample.read_text())
    for mode in ("Knative", "Standard"):
        raw = yaml.safe_load(yaml.safe_dump(manifest["spec"]))
        raw["model"]["registryUri"] = "file:///var/lib/conveyor/registry"
        raw.setdefault("rollout", {})["mode"] = mode
        if mode == "Standard":
            a = raw.setdefault("autoscaling", {})
            a.update({"minReplicas": max(1, a.get("minReplicas", 1)), "metric": "cpu", "target": 70})
        spec = ModelDeploymentSpec.model_validate(raw)
        validate_deployment(spec)
        name = manifest["metadata"]["name"]
        obj = {
            "apiVersion": "conveyor.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "placeholder", "uid": str(uuid.uuid4()), "generation": 1},
            "spec": raw,
        }
        root = f"{raw['model']['registryUri']}/{raw['model']['name']}"
        v1, v2, v3 = ((v, f"{root}/{v}") for v in ("v1", "v2", "v3"))
        yield f"{mode}-stable", build_inference_service(obj, spec, stable=v1)
        for weight in spec.rollout.steps:
            yield (
                f"{mode}-canary-{weight}",
                build_inference_service(obj, spec, stable=v1, candidate=v2, weight=weight),
            )
        yield f"{mode}-promoted", build_inference_service(obj, spec, stable=v2)
        yield f"{mode}-shadow", build_shadow_service(obj, spec, v2)
        versions = [(*v1, 50), (*v2, 50)] if mode == "Knative" else [(*v1, 50), (*v2, 30), (*v3, 20)]
        yield f"{mode}-abn", build_experiment_service(obj, spec, versions)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_kserve_admits_every_inference_service_of_each_sample(
    sample: Path, placement_cluster: Cluster
) -> None:
    """The real KServe defaulting and validating webhooks accept every InferenceService the operator can
    write for each sample ModelDeployment (server-side dry run: the webhooks run, nothing is stored)."""
    refused, variants = {}, 0
    for variant, isvc in _variants(sample):
        variants += 1
        isvc["metadata"]["namespace"] = placement_cluster.ns
        isvc["metadata"].pop("ownerReferences", None)  # the sample ModelDeployment is not created
        try:
            placement_cluster.custom.create_namespaced_custom_object(
                "serving.kserve.io", "v1beta1", placement_cluster.ns, "inferenceservices", isvc, dry_run="All"
            )
        except ApiException as e:
            refused[variant] = e.body
    assert variants >= 8 and refused == {}


def test_kserve_webhook_refuses_what_kserve_cannot_serve(placement_cluster: Cluster) -> None:
    """The premise of the test above: KServe's own validator answers on this apiserver (a canary outside
    Standard mode is refused in KServe's words)."""
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "bad", "annotations": {"serving.kserve.io/deploymentMode": "Knative"}},
        "spec": {
            "predictor": {
                "name": "a",
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": "x",
                        "env": [{"name": "STORAGE_URI", "value": "s3://b/m"}],
                    }
                ],
            },
            "canary": [{"predictor": {"name": "b"}, "trafficPercent": 10}],
        },
    }
    with pytest.raises(ApiException) as refused:
        placement_cluster.custom.create_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", placement_cluster.ns, "inferenceservices", isvc, dry_run="All"
        )
    assert "canary is only supported in Standard deployment mode" in refused.value.body
