"""Standard mode's HTTPRoutes: always watched (kopf starts the watch when their CRD appears), label-selected to
ModelDeployments, and read by the reconcile from that watch's cache (never a LIST per reconcile), but used only
while the API serves them: discovery at startup (handlers._discover_gateway_api; the answer comes from a
stand-in client, one GET), then the HTTPRoute CRD's events (handlers.on_gateway_api_crd: pure functions
here). tests/integration/test_operator_deployment.py (the Standard canary) runs the watch against the real
kube-apiserver; tests/integration/test_gateway_api_late.py installs and removes the CRD under a running
operator."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from kopf._cogs.structs import references
from kopf._core.intents import registries

from conveyor.operator import handlers
from conveyor.operator.controller.client import ApiError
from conveyor.operator.controller.manager import Config, Operator
from conveyor.operator.modeldeployment.reconcile import _routes

HTTPROUTES = references.Resource(
    group="gateway.networking.k8s.io",
    version="v1",
    plural="httproutes",
    kind="HTTPRoute",
    singular="httproute",
    namespaced=True,
    verbs=["list", "watch"],
)


CRDS = references.Resource(
    group="apiextensions.k8s.io",
    version="v1",
    plural="customresourcedefinitions",
    kind="CustomResourceDefinition",
    singular="customresourcedefinition",
    namespaced=False,
    verbs=["list", "watch"],
)


class Discovery:
    """The apiserver's discovery answer for gateway.networking.k8s.io/v1 (None: the group is not served), and
    its answer to a LIST of CustomResourceDefinitions (403 where the operator may not read them)."""

    def __init__(self, resources: list[str] | None, crds_forbidden: bool = False) -> None:
        self.resources = resources
        self.crds_forbidden = crds_forbidden
        self.paths: list[str] = []

    async def get(self, path: str, *, resource: str = "") -> dict[str, Any] | None:
        self.paths.append(path)
        if self.resources is None:
            return None
        return {"kind": "APIResourceList", "resources": [{"name": n} for n in self.resources]}

    async def list(self, path: str, *, field_selector: str | None = None, **_: Any) -> list[dict[str, Any]]:
        self.paths.append(f"{path}?fieldSelector={field_selector}")
        if self.crds_forbidden:
            raise ApiError(403, f"GET {path}: customresourcedefinitions.apiextensions.k8s.io is forbidden")
        return []

    async def close(self) -> None:
        pass


def route(name: str, deployment: str, namespace: str = "ml") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": "1",
            "labels": {"conveyor.dev/model-deployment": deployment},
        },
    }


def watches_httproutes() -> bool:
    """kopf's registry holds an event handler whose resource selector matches HTTPRoutes."""
    return any(
        h.selector is not None and h.selector.check(HTTPROUTES)
        for h in registries.get_default_registry()._watching.get_all_handlers()
    )


def follows_the_crd() -> bool:
    """kopf's registry holds an event handler for CustomResourceDefinitions (handlers.on_gateway_api_crd)."""
    return any(
        h.selector is not None and h.selector.check(CRDS)
        for h in registries.get_default_registry()._watching.get_all_handlers()
    )


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[kopf.OperatorRegistry]:
    """An empty kopf registry for a startup to register into (the module's own handlers are not in it)."""
    default = registries.get_default_registry()
    fresh = kopf.OperatorRegistry()
    kopf.set_default_registry(fresh)
    monkeypatch.setattr(handlers, "_following_the_crd", False)
    try:
        yield fresh
    finally:
        kopf.set_default_registry(default)


def discover(
    resources: list[str] | None, crds_forbidden: bool = False
) -> tuple[Operator, kopf.OperatorSettings, Discovery]:
    async def main() -> tuple[Operator, kopf.OperatorSettings, Discovery]:
        api = Discovery(resources, crds_forbidden)
        op = Operator(client=api)  # type: ignore[arg-type]
        settings = kopf.OperatorSettings()
        await handlers._discover_gateway_api(op, settings)
        return op, settings, api

    return asyncio.run(main())


def test_without_gateway_api_routes_are_watched_but_not_used() -> None:
    for resources in (None, ["grpcroutes", "gateways"]):  # the group absent; served without HTTPRoutes
        op, settings, api = discover(resources)
        assert api.paths[0] == "/apis/gateway.networking.k8s.io/v1"
        assert op.gateway_api is False
        # The watch is there for when the CRD comes (kopf starts it then), label-selected as always.
        assert list(settings.watching.label_selectors.collect(HTTPROUTES)) == [
            "conveyor.dev/model-deployment"
        ]
        assert watches_httproutes()
        assert _routes(op, ("ml", "fraud")) is None  # the reconcile's "no Gateway API": KServe routes


def test_the_crd_is_followed_only_where_the_operator_may_watch_crds(registry: kopf.OperatorRegistry) -> None:
    _, _, api = discover(None, crds_forbidden=True)
    assert api.paths[1] == (
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions?fieldSelector=metadata.name="
        "httproutes.gateway.networking.k8s.io"
    )
    assert not follows_the_crd()  # kopf's watch would be refused, and would stop the operator
    op, _, _ = discover(None)
    assert follows_the_crd() and op.gateway_api is False
    discover(["httproutes"])  # a second start in the same process: still one handler
    assert (
        sum(h.selector is not None and h.selector.check(CRDS) for h in registry._watching.get_all_handlers())
        == 1
    )


def test_served_httproutes_are_watched_by_label_and_read_from_the_cache() -> None:
    op, settings, _ = discover(["httproutes", "httproutes/status", "gateways"])
    assert op.gateway_api is True
    assert list(settings.watching.label_selectors.collect(HTTPROUTES)) == ["conveyor.dev/model-deployment"]
    assert watches_httproutes()
    assert _routes(op, ("ml", "fraud")) == []
    for obj in (
        route("fraud-traffic", "fraud"),
        route("other-traffic", "other"),
        route("fraud", "fraud", "team-b"),
    ):
        op.routes.observe({"type": "ADDED", "object": obj})
    assert [r["metadata"]["name"] for r in _routes(op, ("ml", "fraud")) or []] == ["fraud-traffic"]
    op.routes.observe({"type": "DELETED", "object": route("fraud-traffic", "fraud")})
    assert _routes(op, ("ml", "fraud")) == []


def crd(
    versions: tuple[tuple[str, bool], ...] = (("v1", True), ("v1beta1", True)),
    established: str | None = "True",
    deleting: bool = False,
) -> dict[str, Any]:
    """The HTTPRoute CRD as its watch delivers it."""
    metadata: dict[str, Any] = {"name": "httproutes.gateway.networking.k8s.io"}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    conditions = [{"type": "NamesAccepted", "status": "True"}]
    if established is not None:
        conditions.append({"type": "Established", "status": established})
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": metadata,
        "spec": {
            "group": "gateway.networking.k8s.io",
            "versions": [{"name": n, "served": s} for n, s in versions],
        },
        "status": {"conditions": conditions},
    }


@pytest.mark.parametrize(
    ("obj", "served"),
    [
        (crd(), True),
        (crd(versions=(("v1", True),)), True),
        (crd(established=None), False),  # just created: discovery does not list it yet
        (crd(established="False"), False),
        (crd(versions=(("v1", False), ("v1beta1", True))), False),  # an older install: v1beta1 only
        (crd(versions=(("v1beta1", True),)), False),
        (crd(deleting=True), False),  # being removed: no new route may be created
        ({}, False),
    ],
)
def test_httproutes_served_reads_the_crd(obj: dict[str, Any], served: bool) -> None:
    assert handlers.httproutes_served(obj) is served


class Queued:
    """The deployment queue's `add`, recorded."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []

    def add(self, key: tuple[str, str], after: float = 0.0) -> None:
        self.keys.append(key)


def deployment(name: str, mode: str | None) -> dict[str, Any]:
    rollout = {"mode": mode} if mode else {}
    return {
        "metadata": {"name": name, "namespace": "ml", "resourceVersion": "1"},
        "spec": {"rollout": rollout},
    }


def isvc(name: str, mode: str) -> dict[str, Any]:
    annotations = {"serving.kserve.io/deploymentMode": mode}
    return {"metadata": {"name": name, "namespace": "ml", "resourceVersion": "1", "annotations": annotations}}


def test_a_flip_reconciles_the_standard_deployments_and_removal_drops_the_routes() -> None:
    op = Operator(client=Discovery(None), config=Config(default_kserve_mode="Knative"))  # type: ignore[arg-type]
    queue = op.deployment_queue = Queued()  # type: ignore[assignment]
    for obj in (
        deployment("standard", "Standard"),
        deployment("knative", "Knative"),
        deployment("runs-standard", None),  # no mode named: the one its InferenceService runs in
        deployment("default", None),  # no mode named, no InferenceService yet: the operator's default
    ):
        op.deployments.observe({"type": "ADDED", "object": obj})
    op.isvcs.observe({"type": "ADDED", "object": isvc("runs-standard", "Standard")})
    standard = [("ml", "standard"), ("ml", "runs-standard")]

    handlers.gateway_api_changed(op, False)  # as discovery found it: nothing to do
    assert queue.keys == []
    handlers.gateway_api_changed(op, True)  # the CRD established
    assert op.gateway_api is True and sorted(queue.keys) == sorted(standard)
    op.routes.observe({"type": "ADDED", "object": route("standard-traffic", "standard")})
    handlers.gateway_api_changed(op, True)  # a later change of the CRD (a version added): no flip
    assert len(queue.keys) == 2
    handlers.gateway_api_changed(op, False)  # the CRD removed
    assert op.gateway_api is False and _routes(op, ("ml", "standard")) is None
    assert sorted(queue.keys[2:]) == sorted(standard)
    handlers.gateway_api_changed(op, True)  # installed again: the routes come from the new watch's listing
    assert op.routes.in_namespace("ml") == []


def test_kopfs_warning_about_absent_httproutes_is_dropped_and_others_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kopf_log = logging.getLogger("kopf._core.reactor.observation")
    prefix = "Unresolved resources cannot be served (try creating their CRDs): "
    routes = "Selector(group='gateway.networking.k8s.io', version='v1', any_name='httproutes')"
    rayjobs = "Selector(group='ray.io', version='v1', any_name='rayjobs')"
    with caplog.at_level(logging.WARNING, logger="kopf"):
        kopf_log.warning(prefix + routes)
        kopf_log.warning(prefix + rayjobs)
        kopf_log.warning(prefix + routes + ", " + rayjobs)
    assert [r.getMessage() for r in caplog.records] == [prefix + rayjobs, prefix + routes + ", " + rayjobs]
