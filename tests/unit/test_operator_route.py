"""Standard mode's weighted Gateway API HTTPRoute (operator/modeldeployment/route.py), pure: what the
operator writes at each canary step, after promotion, and when the route is turned off."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.operator.controller import conditions as c
from conveyor.operator.modeldeployment.plan import DeploymentPlan, Resolution, Routing, plan_deployment
from conveyor.operator.modeldeployment.route import (
    NO_ROUTE_MESSAGE,
    backends_of,
    build_route,
    effective_backends,
    hostname,
    parse_gateway,
)
from conveyor.runtime.spec import ModelDeploymentSpec

NOW = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
GATEWAY = ("kserve", "kserve-ingress-gateway")
URL = "http://fraud-ml.example.com"
VISIBILITY = "networking.kserve.io/visibility"
SPEC = {
    "model": {"registryUri": "file:///r", "name": "fraud"},
    "rollout": {"mode": "Standard", "steps": [25, 50, 100]},
    "autoscaling": {"metric": "cpu", "target": 80, "minReplicas": 4, "maxReplicas": 8},
}


def md(status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "fraud", "namespace": "ml", "uid": "u", "generation": 3},
        "spec": spec or SPEC,
        "status": status or {},
    }


def plan(
    obj: dict[str, Any], version: str, isvc: dict[str, Any] | None, routing: Routing | None
) -> DeploymentPlan:
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    return plan_deployment(
        obj,
        spec,
        None,
        Resolution(version, "pinned"),
        isvc,
        lambda v: f"file:///r/fraud/{v}",
        NOW,
        routing=routing,
    )


def kserve_status(p: DeploymentPlan, canary_ready: bool = True) -> dict[str, Any]:
    """The plan's InferenceService as KServe v0.20.0 reports it once it acted: its url (from its domain
    template, also when cluster-local), Ready, a canaryStatuses entry per canary."""
    assert p.inference_service is not None
    isvc = copy.deepcopy(p.inference_service)
    isvc["metadata"]["generation"] = 1
    isvc["status"] = {
        "url": URL,
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True"}],
        "canaryStatuses": [
            {"name": e["predictor"]["name"], "trafficPercent": e["trafficPercent"], "ready": canary_ready}
            for e in isvc["spec"].get("canary") or []
        ],
    }
    return isvc


def kserve_route(name: str) -> dict[str, Any]:
    """A route KServe wrote for the InferenceService before it was labelled cluster-local."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "labels": {"conveyor.dev/model-deployment": "fraud"},
            "ownerReferences": [{"kind": "InferenceService", "name": "fraud", "controller": True}],
        },
        "spec": {"rules": [{"backendRefs": [{"name": "fraud-v1-predictor", "port": 80}]}]},
    }


def test_route_weights_the_predictor_services_on_kserves_gateway_and_host() -> None:
    route = build_route(md(), GATEWAY, "fraud-ml.example.com", [("v1", 75), ("v2", 25)])
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["kind"] == "HTTPRoute"
    assert route["metadata"]["name"] == "fraud-traffic" and route["metadata"]["namespace"] == "ml"
    assert route["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    spec = route["spec"]
    assert spec["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "namespace": "kserve",
            "name": "kserve-ingress-gateway",
        }
    ]
    assert spec["hostnames"] == ["fraud-ml.example.com"]
    (rule,) = spec["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]  # KServe: ^/.*$
    assert backends_of(route) == [("fraud-v1-predictor", 75), ("fraud-v2-predictor", 25)]
    assert {r["port"] for r in rule["backendRefs"]} == {80}


def test_a_canary_gets_its_weight_only_once_kserve_reports_it_ready() -> None:
    not_ready = {"status": {"canaryStatuses": [{"name": "v2", "ready": False, "trafficPercent": 25}]}}
    ready = {"status": {"canaryStatuses": [{"name": "v2", "ready": True, "trafficPercent": 25}]}}
    assert effective_backends([("v1", 75), ("v2", 25)], not_ready) == [("v1", 100)]
    assert effective_backends([("v1", 75), ("v2", 25)], ready) == [("v1", 75), ("v2", 25)]
    assert effective_backends([("v1", 0), ("v2", 100)], ready) == [("v2", 100)]


def test_hostname_is_the_host_of_kserves_url() -> None:
    assert hostname({"status": {"url": "http://fraud-ml.example.com"}}) == "fraud-ml.example.com"
    assert hostname({"status": {}}) is None
    assert hostname({"status": {"url": "http://127.0.0.1:30123"}}) == ""  # no Gateway API hostname


def test_gateway_setting() -> None:
    assert parse_gateway("kserve/kserve-ingress-gateway") == GATEWAY
    assert parse_gateway("") is None and parse_gateway(None) is None
    for bad in ("gateway", "/gw", "ns/", "a/b/c"):
        with pytest.raises(ValueError, match="--standard-gateway"):
            parse_gateway(bad)


def test_standard_canary_steps_through_the_operators_route_and_ends_on_one_backend() -> None:
    routing = Routing(GATEWAY, [])
    p1 = plan(md(), "v1", None, routing)
    assert p1.inference_service is not None
    assert p1.inference_service["metadata"]["labels"][VISIBILITY] == "cluster-local"
    assert p1.route is None  # no host until KServe reports its url
    isvc = kserve_status(p1)
    p1b = plan(md(p1.status), "v1", isvc, routing)
    assert p1b.route is not None and backends_of(p1b.route) == [("fraud-v1-predictor", 100)]
    routing = Routing(GATEWAY, [p1b.route])
    assert plan(md(p1b.status), "v1", isvc, routing).route is None  # unchanged: not applied again

    p2 = plan(md(p1b.status), "v2", isvc, routing)  # canary at 25%
    assert p2.status["canaryWeight"] == 25 and p2.inference_service is not None
    starting = kserve_status(p2, canary_ready=False)
    assert plan(md(p2.status), "v2", starting, routing).route is None  # the canary is not Ready: all on v1
    running = kserve_status(p2)
    p3 = plan(md(p2.status), "v2", running, routing)
    assert p3.route is not None
    assert backends_of(p3.route) == [("fraud-v1-predictor", 75), ("fraud-v2-predictor", 25)]
    routing = Routing(GATEWAY, [p3.route])

    p4 = plan(md({**p3.status, "canaryWeight": 50}), "v2", running, routing)  # the state machine stepped
    assert (
        p4.inference_service is not None and p4.inference_service["spec"]["canary"][0]["trafficPercent"] == 50
    )
    at_50 = kserve_status(p4)
    p5 = plan(md(p4.status), "v2", at_50, routing)
    assert p5.route is not None
    assert backends_of(p5.route) == [("fraud-v1-predictor", 50), ("fraud-v2-predictor", 50)]

    promoted = {
        k: v for k, v in p5.status.items() if k not in ("canaryVersion", "canaryWeight", "rolloutStep")
    }
    promoted.update(stableVersion="v2", rolloutPhase="Promoted")
    p6 = plan(md(promoted), "v2", at_50, routing)
    assert p6.inference_service is not None and "canary" not in p6.inference_service["spec"]
    assert p6.route is not None and backends_of(p6.route) == [("fraud-v2-predictor", 100)]


def test_kserves_own_routes_are_deleted_once_it_was_told_not_to_expose() -> None:
    p1 = plan(md(), "v1", None, Routing(GATEWAY, []))
    theirs = [kserve_route("fraud"), kserve_route("fraud-v1-predictor")]
    unlabelled = kserve_status(p1)
    del unlabelled["metadata"]["labels"][VISIBILITY]
    before = plan(md(p1.status), "v1", unlabelled, Routing(GATEWAY, theirs))
    assert before.delete_routes == []  # KServe would write them again
    after = plan(md(p1.status), "v1", kserve_status(p1), Routing(GATEWAY, theirs))
    assert [r["metadata"]["name"] for r in after.delete_routes] == ["fraud", "fraud-v1-predictor"]


def test_no_gateway_keeps_kserves_exposure_says_so_and_removes_the_route() -> None:
    on = plan(md(), "v1", None, Routing(GATEWAY, []))
    ours = plan(md(on.status), "v1", kserve_status(on), Routing(GATEWAY, [])).route
    assert ours is not None
    off = plan(md(on.status), "v1", kserve_status(on), Routing(None, [ours]))
    assert off.inference_service is not None and VISIBILITY not in off.inference_service["metadata"]["labels"]
    assert off.delete_routes == [ours] and off.route is None
    for routing in (Routing(None, []), Routing(GATEWAY, None)):  # turned off; no Gateway API served
        p1 = plan(md(), "v1", None, routing)
        p2 = plan(md(p1.status), "v2", kserve_status(p1), routing)
        assert VISIBILITY not in p2.inference_service["metadata"]["labels"]
        assert NO_ROUTE_MESSAGE in c.get_condition(p2.status["conditions"], c.PROGRESSING)["message"]


def test_abn_versions_each_at_their_weight() -> None:
    spec = {
        **SPEC,
        "rollout": {
            "mode": "Standard",
            "strategy": "abn",
            "experiment": {
                "versions": [
                    {"version": "v1", "weight": 50},
                    {"version": "v2", "weight": 30},
                    {"version": "v3", "weight": 20},
                ],
                "duration": "1h",
            },
        },
    }
    routing = Routing(GATEWAY, [])
    p1 = plan(md(spec=spec), "v1", None, routing)
    assert p1.inference_service is not None
    assert p1.inference_service["metadata"]["labels"][VISIBILITY] == "cluster-local"
    p2 = plan(md(p1.status, spec), "v1", kserve_status(p1), routing)
    assert p2.route is not None
    assert backends_of(p2.route) == [
        ("fraud-v1-predictor", 50),
        ("fraud-v2-predictor", 30),
        ("fraud-v3-predictor", 20),
    ]


def test_the_local_gateway_reads_the_weights_the_operator_writes() -> None:
    """hack/devstack's router plays the gateway in Standard mode from the route build_route writes."""
    from conveyor_devstack.router import route_weights

    services = {"fraud-v1-predictor": "v1", "fraud-v2-predictor": "v2"}
    route = build_route(md(), GATEWAY, "", [("v1", 75), ("v2", 25)])
    route["metadata"]["creationTimestamp"] = "2026-01-05T12:00:01Z"
    assert "hostnames" not in route["spec"]  # the local router's url is an IP: no Gateway API hostname
    assert route_weights([route], services) == {"v1": 75, "v2": 25}
    assert (
        route_weights([route], {"fraud-v2-predictor": "v2"}) is None
    )  # names a Service not served: not ours
    older = build_route(md(), GATEWAY, "", [("v1", 100)])
    older["metadata"].update(name="kserves", creationTimestamp="2026-01-05T12:00:00Z")
    assert route_weights([route, older], services) == {"v1": 100}  # the Gateway API: the oldest route wins


def test_status_traffic_is_what_the_operators_route_carries() -> None:
    """status.traffic reports the gateway's split (the route's backends), not KServe's canaryStatuses echo."""
    p1 = plan(md(), "v1", None, Routing(GATEWAY, []))
    isvc = kserve_status(p1)
    p1b = plan(md(p1.status), "v1", isvc, Routing(GATEWAY, []))
    assert p1b.status["traffic"] == []  # no route yet: the gateway serves nothing of it
    route_v1 = p1b.route
    assert route_v1 is not None
    routing = Routing(GATEWAY, [route_v1])
    p1c = plan(md(p1b.status), "v1", isvc, routing)
    assert p1c.status["traffic"] == [
        {"version": "v1", "percent": 100, "revision": "fraud-v1-predictor", "tag": "stable"}
    ]

    # KServe reports the canary at 25% but not Ready: the route (and so the gateway) still sends all to v1.
    p2 = plan(md(p1c.status), "v2", isvc, routing)
    starting = kserve_status(p2, canary_ready=False)
    p3 = plan(md(p2.status), "v2", starting, routing)
    assert p3.route is None and p3.status["canaryWeight"] == 25
    assert [(t["version"], t["percent"]) for t in p3.status["traffic"]] == [("v1", 100)]

    # Someone weights the route by hand (1:3): reported as the gateway splits it, versions named by Service.
    edited = copy.deepcopy(route_v1)
    edited["spec"]["rules"][0]["backendRefs"] = [
        {**route_v1["spec"]["rules"][0]["backendRefs"][0], "weight": 1},
        {"name": "fraud-v2-predictor", "port": 80, "weight": 3},
        {"name": "other-predictor", "port": 80, "weight": 0},
    ]
    p4 = plan(md(p3.status), "v2", kserve_status(p2), Routing(GATEWAY, [edited]))
    assert [(t["version"], t["percent"], t["tag"]) for t in p4.status["traffic"]] == [
        ("v1", 25, "stable"),
        ("v2", 75, "canary"),
        ("other-predictor", 0, "unknown"),
    ]
    assert p4.route is not None  # and the operator puts its weights back
    assert backends_of(p4.route) == [("fraud-v1-predictor", 75), ("fraud-v2-predictor", 25)]

    # Without the operator's route (off, or no Gateway API) the status keeps KServe's report.
    off = plan(md(p1c.status), "v1", isvc, Routing(GATEWAY, None))
    assert [(t["version"], t["percent"]) for t in off.status["traffic"]] == [("v1", 100)]


SHADOW_SPEC = {
    **SPEC,
    "rollout": {"mode": "Standard", "strategy": "shadow", "shadow": {"percent": 100}, "steps": [50, 100]},
}


def shadow_status(p: DeploymentPlan, address: str) -> dict[str, Any]:
    """The plan's shadow InferenceService as KServe v0.20.0 reports a cluster-local one: Ready, its
    external url from the domain template and its cluster address."""
    assert p.shadow_service is not None
    shadow = copy.deepcopy(p.shadow_service)
    shadow["metadata"]["generation"] = 1
    shadow["status"] = {
        "url": "http://fraud-shadow-ml.example.com",
        "address": {"url": address},
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    return shadow


@pytest.mark.parametrize("routing", [Routing(GATEWAY, []), Routing(None, []), Routing(GATEWAY, None)])
def test_the_shadow_is_cluster_local_and_mirrored_to_its_cluster_address(routing: Routing) -> None:
    """Standard mode: KServe exposes the shadow nowhere (the label), whatever the gateway route's setting;
    the stable predictor mirrors to the cluster address KServe reports for it."""
    spec = SHADOW_SPEC
    p1 = plan(md(spec=spec), "v1", None, routing)
    isvc = kserve_status(p1)
    p2 = plan(md(p1.status, spec), "v2", isvc, routing)
    assert p2.status.get("shadow", {}).get("version") == "v2"
    assert p2.shadow_service is not None
    assert p2.shadow_service["metadata"]["labels"][VISIBILITY] == "cluster-local"
    address = "http://fraud-shadow-v2-predictor.ml.svc.cluster.local"
    shadow = shadow_status(p2, address)
    obj = md(p2.status, spec)
    p3 = plan_deployment(
        obj,
        ModelDeploymentSpec.model_validate(spec),
        None,
        Resolution("v2", "pinned"),
        isvc,
        lambda v: f"file:///r/fraud/{v}",
        NOW,
        shadow_isvc=shadow,
        routing=routing,
    )
    assert p3.shadow_service is None  # unchanged
    assert p3.inference_service is not None
    env = {e["name"]: e["value"] for e in p3.inference_service["spec"]["predictor"]["containers"][0]["env"]}
    assert env["CONVEYOR_SHADOW_URL"] == address


def test_kserves_routes_for_the_shadow_are_deleted_once_it_is_cluster_local() -> None:
    spec = SHADOW_SPEC
    routing = Routing(GATEWAY, [])
    p1 = plan(md(spec=spec), "v1", None, routing)
    isvc = kserve_status(p1)
    p2 = plan(md(p1.status, spec), "v2", isvc, routing)
    shadow = shadow_status(p2, "http://fraud-shadow-v2-predictor.ml.svc.cluster.local")
    theirs = kserve_route("fraud-shadow")
    theirs["metadata"]["ownerReferences"][0]["name"] = "fraud-shadow"
    s = ModelDeploymentSpec.model_validate(spec)

    def with_shadow(sh: dict[str, Any]) -> DeploymentPlan:
        return plan_deployment(
            md(p2.status, spec),
            s,
            None,
            Resolution("v2", "pinned"),
            isvc,
            lambda v: f"file:///r/fraud/{v}",
            NOW,
            shadow_isvc=sh,
            routing=Routing(GATEWAY, [theirs]),
        )

    exposed = copy.deepcopy(shadow)
    del exposed["metadata"]["labels"][VISIBILITY]
    assert "fraud-shadow" not in [r["metadata"]["name"] for r in with_shadow(exposed).delete_routes]
    assert "fraud-shadow" in [r["metadata"]["name"] for r in with_shadow(shadow).delete_routes]
