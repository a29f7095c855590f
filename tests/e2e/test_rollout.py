"""Progressive delivery end to end on one machine, with nothing faked but the KServe controller itself:
the real kube-apiserver, the operator started with ``--prometheus-url``, the local executor (the stand-in
for KServe) serving each version with KServe's real model server behind its traffic router, a real
Prometheus scraping those predictors through file_sd, and a bounded load of real callers.

Short steps keep each test around a minute: steps [20, 50], interval 5s, window 10s."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _rollout_support import (
    MDEP,
    NAME,
    RATE,
    ROW,
    Stack,
    canary_weight,
    rollout_spec,
    rollout_stack,
    served_weight,
    serving_v1,
    stable_in_isvc,
    wait_until,
)
from _traffic import Load
from conveyor_devstack import faults

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def stack(kubeconfig: str, kube_api: Any, namespace: str, prometheus: Any, fraud_versions: Any,
          tmp_path: Path) -> Iterator[Stack]:
    with rollout_stack(kubeconfig, kube_api, namespace, prometheus, fraud_versions[0], tmp_path) as s:
        yield s


@pytest.mark.parametrize("mode", ["Knative", "Standard"])
def test_a_good_version_is_promoted_through_every_step(stack: Stack, mode: str) -> None:
    url = serving_v1(stack, mode)
    with Load(url, {"instances": [ROW]}, rate=RATE) as load:
        stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": "v2"}}})
        seen: dict[int, float] = {}  # weight -> when the InferenceService's spec first carried it
        served: dict[int, float] = {}  # weight -> when its status first reported that split served
        deadline = time.monotonic() + 150
        while True:
            isvc, status = stack.isvc(), stack.status()
            weight = canary_weight(isvc, mode)
            if weight is not None and weight not in seen:
                seen[weight] = time.monotonic()
            if (split := served_weight(isvc, mode)) and split not in served:
                served[split] = time.monotonic()
            if status.get("stableVersion") == "v2" and weight is None:
                break
            assert time.monotonic() < deadline, f"not promoted; saw weights {sorted(seen)}; status {status}"
            time.sleep(0.25)
        promoted = time.monotonic()
        time.sleep(2)
    assert sorted(seen) == [20, 50], seen
    # What callers saw while the canary held 20%: about a fifth of the answers from v2 (the router is exact
    # per 100 requests; the margin covers the second the executor takes to apply a new weight).
    assert 20 in served and 50 in served, served
    share = [a for a in load.snapshot() if served[20] + 1 < a.sent < served[50]]
    assert share and abs(sum(a.version == "v2" for a in share) / len(share) - 0.2) <= 0.1
    at_50 = [a for a in load.snapshot() if served[50] + 1 < a.sent < promoted]
    assert at_50 and abs(sum(a.version == "v2" for a in at_50) / len(at_50) - 0.5) <= 0.15
    assert {a.version for a in load.snapshot(since=promoted + 1.5)} == {"v2"}
    assert not load.failures(), load.by_version()

    isvc = stack.isvc()
    assert stable_in_isvc(isvc, mode) == "v2"
    if mode == "Standard":
        assert not isvc["spec"].get("canary")
        assert isvc["spec"]["predictor"]["name"].endswith("v2") or "v2" in isvc["spec"]["predictor"]["name"]
        # The split callers saw came from the operator's HTTPRoute (the local router plays the gateway, and
        # without a route sends everything to the stable predictor, as KServe's own route does); after the
        # promotion it has the one backend.
        route = stack.cluster.custom.get_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", stack.cluster.ns, "httproutes", f"{NAME}-traffic")
        assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [
            (f"{NAME}-v2-predictor", 100)]
    status = stack.status()
    passed = [a for a in status["analyses"] if a["verdict"] == "Passed" and a["version"] == "v2"]
    assert len(passed) >= 2, status["analyses"]  # one per step
    rate = next(c for c in passed[-1]["checks"] if "success" in c["name"].lower())
    assert rate["candidate"] >= 0.9
    assert status["rolloutPhase"] == "Stable"


@pytest.mark.parametrize("mode", ["Knative", "Standard"])
def test_a_bad_version_is_rolled_back_and_stable_serves_throughout(stack: Stack, mode: str) -> None:
    url = serving_v1(stack, mode)
    faults.plant(stack.faults_file, faults.fault_key(stack.cluster.ns, NAME, "v2"), error_rate=0.5)
    with Load(url, {"instances": [ROW]}, rate=RATE) as load:
        stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": "v2"}}})
        status = stack.wait("the rollback", lambda s: any(r.get("version") == "v2" for r in s.get("rejectedVersions") or [])
                            and s.get("rolloutPhase") in ("RolledBack", "Stable"), timeout=150)
        wait_until("v1 alone in the InferenceService", stack.isvc,
                   lambda i: canary_weight(i, mode) is None and stable_in_isvc(i, mode) == "v1", timeout=60)
        back = time.monotonic()
        time.sleep(3)
    assert status["stableVersion"] == "v1"
    rejected = next(r for r in status["rejectedVersions"] if r["version"] == "v2")
    assert rejected  # names the failing check and its value (R1's format)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True"
    failed = [a for a in status["analyses"] if a["verdict"] == "Failed"]
    assert failed and any(c["verdict"] == "Failed" and c["candidate"] is not None and c["candidate"] < 0.9
                          for c in failed[-1]["checks"]), failed
    stack.cluster.event(NAME, "Warning", "RolledBack")
    # Callers: the stable version never failed; after the rollback only v1 answers.
    assert not load.failures("v1"), load.by_version()
    assert load.by_version()["v2"][503] > 0  # the planted regression was real traffic
    assert {a.version for a in load.snapshot(since=back + 1)} == {"v1"}


def test_no_promotion_while_prometheus_is_down(stack: Stack) -> None:
    url = serving_v1(stack, "Knative", )
    with Load(url, {"instances": [ROW]}, rate=RATE):
        stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": "v2"}}})
        wait_until("the canary at 20%", stack.isvc, lambda i: canary_weight(i, "Knative") == 20, timeout=90)
        stack.prometheus.stop()
        status = stack.wait("analysis errors", lambda s: (s.get("analysisErrors") or 0) >= 1
                            or s.get("pauseReason") == "AnalysisErrors", timeout=60)
        held_until = time.monotonic() + 15  # three intervals: with Prometheus up it would have stepped
        while time.monotonic() < held_until:
            assert canary_weight(stack.isvc(), "Knative") == 20
            assert stack.status().get("stableVersion") == "v1"
            time.sleep(1)
    status = stack.status()
    errors = [a for a in status["analyses"] if a["verdict"] == "Error"]
    assert errors and "unreachable" in (errors[-1].get("message") or str(errors[-1]["checks"])).lower()
    assert status["canaryWeight"] == 20 and status["rolloutPhase"] in ("Progressing", "Paused")


def test_manual_promote_and_abort(stack: Stack) -> None:
    # A long interval: nothing moves unless a person acts.
    stack.cluster.create(MDEP, NAME, rollout_spec(stack, "Standard", interval="1h"))
    stack.wait("v1 Ready", lambda s: s.get("stableVersion") == "v1" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", [])), timeout=120)
    stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": "v2"}}})
    wait_until("the canary at 20%", stack.isvc, lambda i: canary_weight(i, "Standard") == 20, timeout=90)
    stack.cluster.patch(MDEP, NAME, {"metadata": {"annotations": {"conveyor.dev/rollout-action": "promote@1"}}})
    stack.wait("promoted by hand", lambda s: s.get("stableVersion") == "v2", timeout=60)
    wait_until("v2 alone", stack.isvc, lambda i: canary_weight(i, "Standard") is None
               and stable_in_isvc(i, "Standard") == "v2", timeout=30)

    # v1 again, as a candidate against v2: aborted by hand at its first step.
    stack.cluster.patch(MDEP, NAME, {"spec": {"model": {"version": "v1"}}})
    wait_until("v1 as a canary at 20%", stack.isvc, lambda i: canary_weight(i, "Standard") == 20, timeout=90)
    stack.cluster.patch(MDEP, NAME, {"metadata": {"annotations": {"conveyor.dev/rollout-action": "abort@2"}}})
    status = stack.wait("aborted by hand", lambda s: any(r.get("version") == "v1" for r in s.get("rejectedVersions") or []),
                        timeout=60)
    assert status["stableVersion"] == "v2"
    wait_until("v2 alone again", stack.isvc, lambda i: canary_weight(i, "Standard") is None
               and stable_in_isvc(i, "Standard") == "v2", timeout=30)
