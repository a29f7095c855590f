"""Canary rollouts in the integration tier: a steady load on one exporter per version (the predictor's
own metrics, conveyor.runtime.serving.metrics, scraped by a real Prometheus), and KServe played by the
test (Knative mode): after each spec change it reports the traffic split KServe would."""

from __future__ import annotations

import threading
from typing import Any

from _operator_support import Cluster, wait_for
from prometheus_client import CollectorRegistry, start_http_server

from conveyor.runtime.serving.metrics import ServingMetrics

MDEP = "modeldeployments"


class Load:
    """Steady requests on each version's exporter (scraped once a second), a share of them 5xx."""

    def __init__(self, prometheus: Any, namespace: str, versions: tuple[str, ...] = ("v1", "v2", "v3")) -> None:
        self.error_share: dict[str, float] = {}
        self.metrics: dict[str, ServingMetrics] = {}
        self._servers: list[Any] = []
        self._stop = threading.Event()
        for version in versions:
            registry = CollectorRegistry()
            m = ServingMetrics("fraud", version, task="classification", architecture="mlp", drift=None, registry=registry)
            m.observe_request("v2", 200, 0.01)  # every series exists before the counted load
            m.observe_request("v2", 503, 0.01)
            server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
            self._servers.append(server)
            self.metrics[version] = m
            prometheus.add_target(f"fraud-{version}", f"127.0.0.1:{server.server_port}", {"namespace": namespace})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.05):
            tick += 1
            for version, m in self.metrics.items():
                bad = (tick % 100) < self.error_share.get(version, 0.0) * 100
                m.observe_request("v2", 503 if bad else 200, 0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for server in self._servers:
            server.shutdown()


def env(predictor: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in predictor["containers"][0]["env"]}


def kserve_reports(cluster: Cluster, canary_weight: int | None) -> None:
    """Knative's word on the current spec: the latest revision at the canary's share (or all traffic)."""
    isvc = cluster.isvc("fraud")
    latest = 100 if canary_weight is None else canary_weight
    traffic = [{"revisionName": "fraud-predictor-00002", "percent": latest, "latestRevision": True}]
    if latest < 100:
        traffic.append({"revisionName": "fraud-predictor-00001", "percent": 100 - latest, "latestRevision": False})
    cluster.kserve_sets("fraud", {
        "observedGeneration": isvc["metadata"]["generation"],
        "url": "http://fraud.ns.example.com",
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                       for t in ("PredictorReady", "IngressReady", "Ready")],
        "components": {"predictor": {"traffic": traffic}},
    })


def follow(cluster: Cluster, until: str | tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    """Play KServe until the rollout reaches phase `until`: report every weight the operator asks for."""
    phases = (until,) if isinstance(until, str) else until

    def step() -> dict[str, Any] | None:
        isvc = cluster.isvc("fraud")
        status = cluster.status(MDEP, "fraud")
        if status.get("rolloutPhase") in phases:
            return status
        reported = ((isvc.get("status") or {}).get("components") or {}).get("predictor", {})
        weight = isvc["spec"]["predictor"].get("canaryTrafficPercent")
        latest = next((t["percent"] for t in reported.get("traffic", []) if t.get("latestRevision")), None)
        observed = (isvc.get("status") or {}).get("observedGeneration")
        if (weight if weight is not None else 100) != latest or isvc["metadata"]["generation"] != observed:
            kserve_reports(cluster, weight)
        return None

    return wait_for(f"rollout phase {until}", step, timeout=timeout, interval=0.5)
