"""Standard mode's weighted HTTPRoute (operator/modeldeployment/route.py) is a watched child: the operator,
running for real against the local kube-apiserver (which serves the Gateway API's HTTPRoute CRD,
hack/local-cluster.sh), restores `<name>-traffic` as soon as someone deletes or edits it, removes a route
KServe wrote for the InferenceService, and writes nothing when a route event changes nothing.

The resync is left at its 10 minutes, so a route restored within seconds was restored from the watch. The
test plays KServe's status (the only fake: its controller does not run in this tier; the placement tier
runs the real one, tests/placement/test_kserve.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from _operator_support import Cluster, OperatorProcess, deployment_spec, train, wait_for, wait_until
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster

MDEP = "modeldeployments"
GATEWAY_API = ("gateway.networking.k8s.io", "v1")
ROUTE = "fraud-traffic"
URL = "http://fraud.ml.example.com"
RESTORE_TIMEOUT = 20.0  # seconds; the resync would take 600


@pytest.fixture
def registry(tmp_path: Path, namespace: str) -> str:
    uri = f"file://{tmp_path}/registry"
    train(uri, "fraud", pipeline="offline", namespace=namespace, run=1, accuracy=0.9)
    return uri


@pytest.fixture
def operator(kubeconfig: str, namespace: str) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, namespace, "--resync-seconds", "600").start()
    try:
        yield op
    finally:
        op.stop()
        print(op.logs())  # shown by pytest when the test failed


def route(cluster: Cluster, name: str = ROUTE) -> dict[str, Any] | None:
    try:
        return cluster.custom.get_namespaced_custom_object(*GATEWAY_API, cluster.ns, "httproutes", name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def backends(r: dict[str, Any]) -> list[tuple[str, int]]:
    return [(b["name"], b.get("weight", 1)) for rule in r["spec"]["rules"] for b in rule.get("backendRefs") or []]


def settled_writes(operator: OperatorProcess) -> float:
    """The operator's write count once it has stopped moving (events are posted in the background)."""
    last = [operator.writes()]

    def quiet() -> bool:
        time.sleep(1.0)
        now = operator.writes()
        was, last[0] = last[0], now
        return now == was

    wait_for("the operator's writes to stop", quiet, timeout=30, interval=0.0)
    return last[0]


def test_the_route_is_restored_from_the_watch_and_status_reports_it(
    cluster: Cluster, operator: OperatorProcess, registry: str
) -> None:
    cluster.create(
        MDEP,
        "fraud",
        deployment_spec(
            registry,
            "v1",
            rollout={"mode": "Standard", "steps": [25, 100]},
            autoscaling={"minReplicas": 1, "maxReplicas": 2, "metric": "cpu", "target": 70},
        ),
    )
    isvc = wait_for("the InferenceService", lambda: cluster.isvc("fraud"))
    assert isvc["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    cluster.kserve_sets(
        "fraud",
        {"url": URL, "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    )
    first = wait_for("the operator's route", lambda: route(cluster))
    assert backends(first) == [("fraud-v1-predictor", 100)]
    assert first["spec"]["hostnames"] == [urlsplit(URL).hostname]
    # status.traffic: what the route carries.
    traffic = wait_until("status.traffic from the route", lambda: cluster.status(MDEP, "fraud").get("traffic"), bool)
    assert traffic == [{"version": "v1", "percent": 100, "revision": "fraud-v1-predictor", "tag": "stable"}]

    # Someone deletes the route: it comes back (a new object), with the same backends, host and gateway.
    cluster.custom.delete_namespaced_custom_object(*GATEWAY_API, cluster.ns, "httproutes", ROUTE)
    uid = first["metadata"]["uid"]
    again = wait_for(
        "the route restored after its deletion",
        lambda: (r := route(cluster)) is not None and r["metadata"]["uid"] != uid and r,
        timeout=RESTORE_TIMEOUT,
    )
    assert again["spec"] == first["spec"]

    # Someone points it at another host and weights: put back.
    cluster.custom.patch_namespaced_custom_object(
        *GATEWAY_API, cluster.ns, "httproutes", ROUTE, {"spec": {"hostnames": ["elsewhere.example.com"]}}
    )
    wait_until(
        "the route's host put back", lambda: route(cluster), lambda r: r["spec"]["hostnames"] == [urlsplit(URL).hostname],
        timeout=RESTORE_TIMEOUT,
    )

    # A route KServe wrote for the InferenceService (before it was labelled cluster-local): deleted.
    isvc = cluster.isvc("fraud")
    theirs = {
        "apiVersion": "/".join(GATEWAY_API),
        "kind": "HTTPRoute",
        "metadata": {
            "name": "fraud",
            "labels": {"conveyor.dev/model-deployment": "fraud", "app.kubernetes.io/managed-by": "conveyor"},
            "ownerReferences": [
                {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "name": "fraud",
                 "uid": isvc["metadata"]["uid"], "controller": True}
            ],
        },
        "spec": {"rules": [{"backendRefs": [{"name": "fraud-v1-predictor", "port": 80}]}]},
    }
    cluster.custom.create_namespaced_custom_object(*GATEWAY_API, cluster.ns, "httproutes", theirs)
    wait_for("KServe's route deleted", lambda: route(cluster, "fraud") is None, timeout=RESTORE_TIMEOUT)

    # A route event that changes nothing the operator owns: reconciled, nothing written.
    writes = settled_writes(operator)
    reconciles = operator.metric("conveyor_reconcile_total", kind="ModelDeployment")
    cluster.custom.patch_namespaced_custom_object(
        *GATEWAY_API, cluster.ns, "httproutes", ROUTE, {"metadata": {"labels": {"team": "fraud"}}}
    )
    wait_for(
        "the route event's reconcile",
        lambda: operator.metric("conveyor_reconcile_total", kind="ModelDeployment") > reconciles,
        timeout=RESTORE_TIMEOUT,
    )
    assert settled_writes(operator) == writes
    assert backends(route(cluster) or {}) == [("fraud-v1-predictor", 100)]
