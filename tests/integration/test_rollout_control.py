"""Canary rollouts with the operator running for real on the real kube-apiserver: judged by a real
Prometheus that scrapes the predictor's own metrics (conveyor.runtime.serving.metrics, one exporter
per version, fed a steady load by the test), and steered by hand with `kubectl conveyor`. The test
plays KServe (Knative mode): after each spec change it reports the traffic split KServe would.
Real predictors, the traffic router and planted faults are in tests/e2e/test_rollout.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _operator_support import Cluster, OperatorProcess, deployment_spec, train, wait_for, wait_until
from prometheus_client import CollectorRegistry, start_http_server

from conveyor.runtime.serving.metrics import ServingMetrics

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MDEP = "modeldeployments"
ROLLOUT = {
    "steps": [30, 100],
    "interval": "4s",
    "analysis": {"window": "10s", "minRequests": 5, "minSuccessRate": 0.95, "failureLimit": 0,
                 "consecutiveErrorLimit": 1},
}


@pytest.fixture
def registry(tmp_path: Path, namespace: str) -> str:
    uri = f"file://{tmp_path}/registry"
    for run in (1, 2, 3):
        train(uri, "fraud", pipeline="offline", namespace=namespace, run=run, accuracy=0.9 + run / 100)
    return uri


class Load:
    """Steady requests on each version's exporter (scraped once a second), a share of them 5xx."""

    def __init__(self, prometheus: Any, namespace: str) -> None:
        self.error_share: dict[str, float] = {}
        self.metrics: dict[str, ServingMetrics] = {}
        self._servers: list[Any] = []
        self._stop = threading.Event()
        for version in ("v1", "v2", "v3"):
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


@pytest.fixture
def load(prometheus: Any, namespace: str) -> Iterator[Load]:
    generator = Load(prometheus, namespace)
    try:
        yield generator
    finally:
        generator.stop()


@pytest.fixture
def analysing_operator(kubeconfig: str, namespace: str, prometheus: Any) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, namespace, "--prometheus-url", prometheus.url).start()
    try:
        yield op
    finally:
        op.stop()
        print(op.logs())


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


def follow(cluster: Cluster, until: str, timeout: float = 60) -> dict[str, Any]:
    """Play KServe until the rollout reaches phase `until`: report every weight the operator asks for."""
    def step() -> dict[str, Any] | None:
        predictor = cluster.isvc("fraud")["spec"]["predictor"]
        status = cluster.status(MDEP, "fraud")
        if status.get("rolloutPhase") == until:
            return status
        reported = ((cluster.isvc("fraud").get("status") or {}).get("components") or {}).get("predictor", {})
        weight = predictor.get("canaryTrafficPercent")
        latest = next((t["percent"] for t in reported.get("traffic", []) if t.get("latestRevision")), None)
        if (weight if weight is not None else 100) != latest or cluster.isvc("fraud")["metadata"]["generation"] != (
            cluster.isvc("fraud").get("status") or {}
        ).get("observedGeneration"):
            kserve_reports(cluster, weight)
        return None

    return wait_for(f"rollout phase {until}", step, timeout=timeout, interval=0.5)


def kubectl_conveyor(kubeconfig: str, namespace: str, *args: str) -> str:
    exe = Path(sys.executable).with_name("kubectl-conveyor")
    out = subprocess.run([str(exe), *args, "-n", namespace, "--kubeconfig", kubeconfig],
                         capture_output=True, text=True, timeout=60, env=os.environ)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_good_version_promoted_bad_version_rolled_back(
    cluster: Cluster, analysing_operator: OperatorProcess, load: Load, registry: str
) -> None:
    cluster.create(MDEP, "fraud", deployment_spec(registry, "v1", rollout=ROLLOUT))
    wait_for("v1", lambda: env(cluster.isvc("fraud")["spec"]["predictor"])["STORAGE_URI"].endswith("/v1"))
    kserve_reports(cluster, None)
    # v2 is good: every step analysed, then promoted.
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})
    wait_for("canary", lambda: cluster.status(MDEP, "fraud").get("canaryVersion") == "v2")
    status = follow(cluster, "Stable", timeout=90)
    assert status["stableVersion"] == "v2" and "canaryTrafficPercent" not in cluster.isvc("fraud")["spec"]["predictor"]
    assert [a["verdict"] for a in status["analyses"]][-2:] == ["Passed", "Passed"]
    assert [a["weight"] for a in status["analyses"]][-2:] == [30, 100]
    assert analysing_operator.metric("conveyor_rollouts_finished_total", outcome="Promoted") == 1
    # v3 answers 30% of its requests with a 503: rolled back, and v2 keeps serving.
    load.error_share["v3"] = 0.3
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v3"}}})
    wait_for("canary v3", lambda: cluster.status(MDEP, "fraud").get("canaryVersion") == "v3")
    status = follow(cluster, "RolledBack", timeout=90)
    predictor = cluster.isvc("fraud")["spec"]["predictor"]
    assert env(predictor)["CONVEYOR_MODEL_VERSION"] == "v2" and "canaryTrafficPercent" not in predictor
    rejected = status["rejectedVersions"][-1]
    assert (rejected["version"], rejected["check"]) == ("v3", "successRate") and rejected["value"] < 0.95
    assert cluster.condition(MDEP, "fraud", "Degraded")["reason"] == "RolledBack"  # type: ignore[index]
    assert any(e[0] == "Warning" and e[1] == "RolledBack" and "successRate" in e[2] for e in cluster.events("fraud"))
    assert analysing_operator.metric("conveyor_rollouts_finished_total", outcome="RolledBack") == 1


def test_prometheus_stopped_never_promotes_and_kubectl_conveyor_steers(
    kubeconfig: str, cluster: Cluster, analysing_operator: OperatorProcess, load: Load, prometheus: Any,
    registry: str,
) -> None:
    ns = cluster.ns
    cluster.create(MDEP, "fraud", deployment_spec(registry, "v1", rollout=ROLLOUT))
    wait_for("v1", lambda: env(cluster.isvc("fraud")["spec"]["predictor"])["STORAGE_URI"].endswith("/v1"))
    kserve_reports(cluster, None)
    prometheus.stop()
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})
    status = follow(cluster, "Paused", timeout=60)
    assert (status["pauseReason"], status["canaryWeight"], status["stableVersion"]) == ("AnalysisErrors", 30, "v1")
    assert "unreachable" in status["analyses"][-1]["message"]
    assert "Paused" in kubectl_conveyor(kubeconfig, ns, "status", "fraud")
    # A person promotes by hand.
    kubectl_conveyor(kubeconfig, ns, "promote", "fraud")
    status = wait_until("promoted", lambda: cluster.status(MDEP, "fraud"), lambda s: s.get("stableVersion") == "v2")
    assert "canaryVersion" not in status and "canaryTrafficPercent" not in cluster.isvc("fraud")["spec"]["predictor"]
    # The next version is paused by hand, then aborted.
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v3"}}})
    wait_for("canary v3", lambda: cluster.status(MDEP, "fraud").get("canaryVersion") == "v3")
    kubectl_conveyor(kubeconfig, ns, "pause", "fraud")
    wait_for("paused", lambda: cluster.status(MDEP, "fraud").get("pauseReason") == "PausedByUser")
    kubectl_conveyor(kubeconfig, ns, "abort", "fraud")
    status = follow(cluster, "RolledBack")
    assert status["rejectedVersions"][-1]["check"] == "Aborted" and status["stableVersion"] == "v2"
    assert env(cluster.isvc("fraud")["spec"]["predictor"])["CONVEYOR_MODEL_VERSION"] == "v2"
    # retry takes the rejected version again.
    kubectl_conveyor(kubeconfig, ns, "resume", "fraud")
    kubectl_conveyor(kubeconfig, ns, "retry", "fraud")
    wait_for("v3 again", lambda: cluster.status(MDEP, "fraud").get("canaryVersion") == "v3")


def test_standard_mode_canary_promotion_and_abort_as_kserve_reads_them(
    kubeconfig: str, cluster: Cluster, operator: OperatorProcess, registry: str
) -> None:
    """Standard mode: spec.canary[] with trafficPercent and the canary's share of minReplicas; promotion
    renames the stable predictor and drops the entry; an abort drops it at once."""
    ns = cluster.ns
    rollout = {**ROLLOUT, "mode": "Standard"}
    scaling = {"minReplicas": 2, "maxReplicas": 4, "metric": "cpu", "target": 70}
    cluster.create(MDEP, "fraud", deployment_spec(registry, "v1", rollout=rollout, autoscaling=scaling))
    wait_for("v1", lambda: cluster.isvc("fraud")["spec"]["predictor"].get("name") == "v1")
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})
    canary = wait_for("spec.canary", lambda: cluster.isvc("fraud")["spec"].get("canary"))
    assert (canary[0]["predictor"]["name"], canary[0]["trafficPercent"], canary[0]["predictor"]["minReplicas"]) == ("v2", 30, 1)
    # KServe reports the canary (and that it has no ingress to split traffic with): surfaced as is.
    cluster.kserve_sets("fraud", {
        "observedGeneration": cluster.isvc("fraud")["metadata"]["generation"],
        "conditions": [
            {"type": "CanaryPredictorReady", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "IngressReady", "status": "False", "reason": "NoIngress", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
        "canaryStatuses": [{"name": "v2", "ready": True, "trafficPercent": 30}],
    })
    status = wait_until("KServe's conditions", lambda: cluster.status(MDEP, "fraud"),
                        lambda s: len(s.get("inferenceServiceConditions", [])) == 2)
    assert {(c["type"], c["status"]) for c in status["inferenceServiceConditions"]} == {
        ("CanaryPredictorReady", "True"), ("IngressReady", "False")}
    progressing = cluster.condition(MDEP, "fraud", "Progressing")
    assert progressing is not None and "enableGatewayApi" in progressing["message"]
    assert "stepStartTime" not in status  # nothing is split without an ingress: the hold has not begun
    kubectl_conveyor(kubeconfig, ns, "promote", "fraud")
    wait_for("promoted", lambda: cluster.isvc("fraud")["spec"]["predictor"].get("name") == "v2")
    assert "canary" not in cluster.isvc("fraud")["spec"]
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v3"}}})
    wait_for("canary v3", lambda: cluster.isvc("fraud")["spec"].get("canary"))
    kubectl_conveyor(kubeconfig, ns, "abort", "fraud")
    wait_for("canary dropped", lambda: "canary" not in cluster.isvc("fraud")["spec"])
    assert cluster.isvc("fraud")["spec"]["predictor"]["name"] == "v2"
    assert cluster.status(MDEP, "fraud")["rolloutPhase"] == "RolledBack"
