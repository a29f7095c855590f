"""Canary rollouts with the operator running for real on the real kube-apiserver: judged by a real
Prometheus that scrapes the predictor's own metrics (conveyor.runtime.serving.metrics, one exporter
per version, fed a steady load by the test), and steered by hand with `kubectl conveyor`. The test
plays KServe (Knative mode): after each spec change it reports the traffic split KServe would.
Real predictors, the traffic router and planted faults are in tests/e2e/test_rollout.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _canary_support import MDEP, Load, env, follow, kserve_reports
from _operator_support import Cluster, OperatorProcess, deployment_spec, train, wait_for, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

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
    cluster.event("fraud", "Warning", "RolledBack", says="successRate")
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
