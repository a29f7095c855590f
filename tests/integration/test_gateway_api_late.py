"""A Gateway API installed after the operator started is used without a restart, and its removal is followed.

A platform team often installs the operator first and Envoy Gateway / Istio (the Gateway API CRDs) later.
The operator follows the HTTPRoute CRD (handlers.on_gateway_api_crd): once it is established, Standard-mode
ModelDeployments get their weighted `<name>-traffic` route and report status.traffic from it; once it is
removed, routing goes back to KServe. This test deletes the session cluster's HTTPRoute CRD (installed by
hack/local-cluster.sh) before the operator starts and puts it back, so it restores it in a `finally`, and
waits until the apiserver serves it again, for the tests that run after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _operator_support import (
    GATEWAY_API,
    Cluster,
    OperatorProcess,
    backends,
    deployment_spec,
    route,
    train,
    wait_for,
    wait_until,
)
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster

MDEP = "modeldeployments"
CRD = "httproutes.gateway.networking.k8s.io"
CLUSTER_LOCAL = ("networking.kserve.io/visibility", "cluster-local")
TIMEOUT = 20.0  # seconds for the operator to follow the CRD; its resync is at 10 minutes


class GatewayApi:
    """The session cluster's HTTPRoute CRD, as hack/local-cluster.sh installed it: removed and put back."""

    def __init__(self, api: client.ApiClient) -> None:
        self.crds = client.ApiextensionsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        # Raw JSON: the client's models would drop fields newer than themselves (CEL rules' reason, ...).
        crd = json.loads(self.crds.read_custom_resource_definition(CRD, _preload_content=False).data)
        meta = crd["metadata"]
        self.manifest = {
            "apiVersion": crd["apiVersion"],
            "kind": crd["kind"],
            "metadata": {k: meta[k] for k in ("name", "labels", "annotations") if k in meta},
            "spec": crd["spec"],
        }

    def served(self) -> bool:
        """Discovery lists httproutes (what the operator's startup and kopf read)."""
        try:
            found = self.custom.get_api_resources(*GATEWAY_API)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return any(r.name == "httproutes" for r in found.resources)

    def remove(self) -> None:
        self.crds.delete_custom_resource_definition(CRD)
        wait_for("the Gateway API no longer served", lambda: not self.served(), timeout=TIMEOUT)
        wait_for("the HTTPRoute CRD deleted", lambda: not self._exists(), timeout=TIMEOUT)

    def install(self) -> None:
        # The field manager hack/local-cluster.sh applies the CRDs with, so its next `up` owns them again.
        self.crds.create_custom_resource_definition(self.manifest, field_manager="conveyor-local-cluster")
        wait_for("the Gateway API served", self.served, timeout=TIMEOUT)

    def _exists(self) -> bool:
        try:
            self.crds.read_custom_resource_definition(CRD)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True


@pytest.fixture
def gateway_api(kube_api: client.ApiClient) -> Iterator[GatewayApi]:
    gw = GatewayApi(kube_api)
    try:
        yield gw
    finally:
        if not gw.served():
            if gw._exists():  # still being deleted: wait for it to go before creating it again
                wait_for("the HTTPRoute CRD deleted", lambda: not gw._exists(), timeout=60)
            gw.install()


def split(status: dict[str, Any]) -> list[tuple[str, int, str]]:
    """status.traffic: each version's share and where it goes (the route's backend Service, or KServe's)."""
    return [(t["version"], t["percent"], t.get("revision", "")) for t in status.get("traffic") or []]


def cluster_local(cluster: Cluster) -> bool:
    labels = cluster.isvc("fraud")["metadata"].get("labels") or {}
    return labels.get(CLUSTER_LOCAL[0]) == CLUSTER_LOCAL[1]


def test_gateway_api_installed_after_the_operator_started_is_used_and_its_removal_followed(
    kubeconfig: str, cluster: Cluster, gateway_api: GatewayApi, tmp_path: Path
) -> None:
    registry = f"file://{tmp_path}/registry"
    train(registry, "fraud", pipeline="offline", namespace=cluster.ns, run=1, accuracy=0.9)
    gateway_api.remove()
    op = OperatorProcess(kubeconfig, cluster.ns).start()
    try:
        spec = deployment_spec(
            registry,
            "v1",
            rollout={"mode": "Standard"},
            autoscaling={"minReplicas": 1, "maxReplicas": 2, "metric": "cpu", "target": 70},
        )
        cluster.create(MDEP, "fraud", spec)
        wait_for("InferenceService", lambda: cluster.isvc("fraud"))
        cluster.kserve_sets(
            "fraud",
            {
                "url": "http://fraud.ns.example.com",
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                ],
            },
        )
        # No Gateway API: KServe exposes the InferenceService (no cluster-local label), unsplit.
        status = wait_until(
            "Ready without a route",
            lambda: cluster.status(MDEP, "fraud"),
            lambda s: s.get("stableVersion") == "v1" and s.get("url"),
        )
        assert not cluster_local(cluster)
        assert split(status) == [("v1", 100, "stable")]  # as KServe reports it, no predictor Service named

        # The platform team installs the Gateway API: the operator's route, without a restart.
        gateway_api.install()
        ours = wait_for("the operator's route", lambda: route(cluster), timeout=TIMEOUT)
        assert backends(ours) == [("fraud-v1-predictor", 100)]
        assert ours["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
        wait_until(
            "status.traffic from the route",
            lambda: cluster.status(MDEP, "fraud"),
            lambda s: split(s) == [("v1", 100, "fraud-v1-predictor")],
            timeout=TIMEOUT,
        )
        assert cluster_local(cluster)  # KServe told not to expose it itself
        # kopf started the HTTPRoute watch when the CRD appeared: a deleted route is restored at once.
        cluster.custom.delete_namespaced_custom_object(
            *GATEWAY_API, cluster.ns, "httproutes", "fraud-traffic"
        )
        wait_for(
            "the route restored from the watch",
            lambda: (r := route(cluster)) is not None and r["metadata"]["uid"] != ours["metadata"]["uid"],
            timeout=TIMEOUT,
        )

        # ... and removes it again: routing goes back to KServe, and the operator keeps running.
        gateway_api.remove()
        wait_for(
            "the InferenceService exposed by KServe again",
            lambda: not cluster_local(cluster),
            timeout=TIMEOUT,
        )
        status = wait_until(
            "status.traffic without the route",
            lambda: cluster.status(MDEP, "fraud"),
            lambda s: split(s) == [("v1", 100, "stable")],
            timeout=TIMEOUT,
        )
        assert status["stableVersion"] == "v1"
        # ... and still reconciles: a spec change reaches the InferenceService.
        cluster.patch(MDEP, "fraud", {"spec": {"autoscaling": {"maxReplicas": 3}}})
        wait_for("maxReplicas 3", lambda: cluster.isvc("fraud")["spec"]["predictor"]["maxReplicas"] == 3)
        assert op.alive()
    finally:
        op.stop()
        print(op.logs())
