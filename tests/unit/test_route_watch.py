"""Standard mode's HTTPRoutes are watched only where the API serves them (discovery at startup,
handlers._watch_routes_if_served), label-selected to ModelDeployments, and the reconcile reads them from
that watch's cache (never a LIST per reconcile). The discovery answer comes from a stand-in client (one GET);
tests/integration/test_operator_deployment.py (the Standard canary) runs the watch against the real
kube-apiserver."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from kopf._cogs.structs import references
from kopf._core.intents import registries

from conveyor.operator import handlers
from conveyor.operator.controller.manager import Operator
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


class Discovery:
    """The apiserver's discovery answer for gateway.networking.k8s.io/v1 (None: the group is not served)."""

    def __init__(self, resources: list[str] | None) -> None:
        self.resources = resources
        self.paths: list[str] = []

    async def get(self, path: str, *, resource: str = "") -> dict[str, Any] | None:
        self.paths.append(path)
        if self.resources is None:
            return None
        return {"kind": "APIResourceList", "resources": [{"name": n} for n in self.resources]}

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


def discover(resources: list[str] | None) -> tuple[Operator, kopf.OperatorSettings, Discovery]:
    async def main() -> tuple[Operator, kopf.OperatorSettings, Discovery]:
        api = Discovery(resources)
        op = Operator(client=api)  # type: ignore[arg-type]
        settings = kopf.OperatorSettings()
        await handlers._watch_routes_if_served(op, settings)
        return op, settings, api

    return asyncio.run(main())


def test_no_gateway_api_no_watch_and_no_routes() -> None:
    watched = watches_httproutes()  # False unless a test of a served API ran before in this process
    for resources in (None, ["grpcroutes", "gateways"]):  # the group absent; served without HTTPRoutes
        op, settings, api = discover(resources)
        assert api.paths == ["/apis/gateway.networking.k8s.io/v1"]
        assert op.gateway_api is False
        assert list(settings.watching.label_selectors.collect(HTTPROUTES)) == []
        assert _routes(op, ("ml", "fraud")) is None  # the reconcile's "no Gateway API": KServe routes
        assert watches_httproutes() == watched  # no handler registered


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
