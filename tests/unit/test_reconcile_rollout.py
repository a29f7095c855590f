"""The ModelDeployment reconcile driving a canary on the in-memory fake API: stepping, promotion,
rollback (both KServe modes), pause and manual actions, with one apply and one status write per step.

KServe's part (reporting the traffic split) is played by the test editing the InferenceService's
status, and Prometheus by `ScriptedPrometheus`, a fake that answers the analysis' queries from a table
(the real Prometheus is exercised in tests/integration/test_rollout_analysis.py)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from _fake_api import FakeApi
from prometheus_client import REGISTRY
from test_reconcile import NOW, NS, commit_version, registry  # noqa: F401 - registry is a fixture

from conveyor.operator.controller.manager import Operator
from conveyor.operator.controller.prometheus import PrometheusError, Sample
from conveyor.operator.controller.times import rfc3339
from conveyor.operator.modeldeployment.reconcile import reconcile_deployment

KEY = (NS, "fraud")


@dataclass
class ScriptedPrometheus:
    """A fake Prometheus: requests and success rate per version from the table; `down` raises."""

    success: dict[str, float] = field(default_factory=lambda: {"v1": 1.0, "v2": 1.0})
    requests: float = 100.0
    down: bool = False
    queries: list[str] = field(default_factory=list)

    async def query(self, promql: str) -> list[Sample]:
        self.queries.append(promql)
        if self.down:
            raise PrometheusError(f"query {promql!r}: Prometheus at http://prometheus unreachable (connection refused)")
        version = re.search(r'model_version="([^"]+)"', promql).group(1)  # type: ignore[union-attr]
        if " / " in promql:
            return [Sample({}, self.success.get(version, 1.0))]
        return [Sample({}, self.requests)]

    async def close(self) -> None:
        pass


@dataclass
class Harness:
    op: Operator
    api: FakeApi
    prom: ScriptedPrometheus
    clock: list[Any]

    async def reconcile(self) -> list[tuple[str, str, str]]:
        """One reconcile with the caches up to date; the writes it made."""
        self.op.deployments.remember(self.api.find("ModelDeployment", NS, "fraud"))  # type: ignore[arg-type]
        isvc = self.api.find("InferenceService", NS, "fraud")
        if isvc is not None:
            self.op.isvcs.remember(isvc)
        for route in self.api.kinds("HTTPRoute"):  # what the HTTPRoute watch would have delivered
            self.op.routes.remember(route)
        self.api.writes.clear()
        await reconcile_deployment(self.op, KEY)
        return list(self.api.writes)

    async def events(self) -> list[tuple[str, str, str]]:
        await self.op._events.drain()  # events are posted in the background
        return self.api.events

    def status(self) -> dict[str, Any]:
        return self.api.find("ModelDeployment", NS, "fraud")["status"]  # type: ignore[index]

    def isvc(self) -> dict[str, Any]:
        return self.api.find("InferenceService", NS, "fraud")  # type: ignore[return-value]

    def condition(self, type_: str) -> tuple[str, str]:
        c = next(c for c in self.status()["conditions"] if c["type"] == type_)
        return c["status"], c["reason"]

    def edit_spec(self, **rollout_or_model: Any) -> None:
        stored = self.api.objects[("modeldeployments", NS, "fraud")]
        for section, values in rollout_or_model.items():
            stored["spec"].setdefault(section, {}).update(values)
        stored["metadata"]["generation"] += 1
        self.api.edit(stored)

    def annotate(self, value: str) -> None:
        stored = self.api.objects[("modeldeployments", NS, "fraud")]
        self.api.edit(stored, annotations={"conveyor.dev/rollout-action": value})

    def kserve_reports(self, canary_weight: int | None) -> None:
        """KServe's controller observes the latest spec and reports it Ready with this canary share."""
        stored = self.api.objects[("inferenceservices", NS, "fraud")]
        ready = [{"type": t, "status": "True"} for t in ("PredictorReady", "IngressReady", "Ready")]
        status: dict[str, Any] = {"observedGeneration": stored["metadata"]["generation"], "conditions": ready,
                                  "url": "http://fraud.ml.example.com"}
        if stored["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative":
            traffic = [{"revisionName": "fraud-predictor-00001", "percent": 100, "latestRevision": True}]
            if canary_weight is not None:
                traffic = [{"revisionName": "fraud-predictor-00002", "percent": canary_weight, "latestRevision": True},
                           {"revisionName": "fraud-predictor-00001", "percent": 100 - canary_weight}]
            status["components"] = {"predictor": {"traffic": traffic}}
        elif canary_weight is not None:
            name = stored["spec"]["canary"][0]["predictor"]["name"]
            status["canaryStatuses"] = [{"name": name, "ready": True, "trafficPercent": canary_weight}]
        stored["status"] = status
        self.api.edit(stored)

    def later(self, seconds: float) -> None:
        self.clock[0] += timedelta(seconds=seconds)


def run(rollout: dict[str, Any], scenario: Callable[[Harness], Awaitable[None]], registry: str, **spec: Any) -> None:  # noqa: F811
    v1 = commit_version(registry)
    v2 = commit_version(registry)
    assert (v1, v2) == ("v1", "v2")

    async def main() -> None:
        clock = [NOW]
        api = FakeApi()
        prom = ScriptedPrometheus()
        op = Operator(client=api, clock=lambda: clock[0], prometheus=prom)  # type: ignore[arg-type]
        op.gateway_api = True  # the fake API serves HTTPRoutes (discovery, handlers.py)
        body = {"model": {"registryUri": registry, "name": "fraud", "version": "v1"},
                "rollout": {"interval": "1m", **rollout}, **spec}
        api.put({"apiVersion": "conveyor.dev/v1alpha1", "kind": "ModelDeployment",
                 "metadata": {"name": "fraud", "namespace": NS}, "spec": body})
        h = Harness(op, api, prom, clock)
        await h.reconcile()
        h.kserve_reports(None)
        await h.reconcile()
        assert h.condition("Ready")[0] == "True"
        try:
            await scenario(h)
        finally:
            await op.stop()

    asyncio.run(main())


def finished(outcome: str) -> float:
    return REGISTRY.get_sample_value(
        "conveyor_rollouts_finished_total", {"namespace": NS, "deployment": "fraud", "outcome": outcome}
    ) or 0.0


def test_good_version_steps_through_and_is_promoted(registry: str) -> None:  # noqa: F811
    before = finished("Promoted")

    async def scenario(h: Harness) -> None:
        h.edit_spec(model={"version": "v2"})
        assert await h.reconcile() == [("apply", "InferenceService", "fraud"), ("status", "ModelDeployment", "fraud")]
        assert h.isvc()["spec"]["predictor"]["canaryTrafficPercent"] == 10
        for weight, after in ((10, 50), (50, 100)):
            h.kserve_reports(weight)
            assert await h.reconcile() == [("status", "ModelDeployment", "fraud")]  # the hold begins
            assert h.status()["nextAnalysisTime"] == rfc3339(h.clock[0] + timedelta(minutes=1))
            assert await h.reconcile() == []  # not due: nothing queried, nothing written
            h.later(60)
            # One apply (the next weight) and one status write per step.
            assert await h.reconcile() == [("apply", "InferenceService", "fraud"), ("status", "ModelDeployment", "fraud")]
            assert h.isvc()["spec"]["predictor"]["canaryTrafficPercent"] == after
            assert (h.status()["canaryWeight"], h.status()["rolloutStep"]) == (after, 1 if after == 50 else 2)
        h.kserve_reports(100)
        await h.reconcile()
        h.later(60)
        await h.reconcile()
        status = h.status()
        assert (status["stableVersion"], status["rolloutPhase"]) == ("v2", "Stable") and "canaryVersion" not in status
        assert "canaryTrafficPercent" not in h.isvc()["spec"]["predictor"]
        assert [a["verdict"] for a in status["analyses"]] == ["Passed"] * 3
        rate = next(c for c in status["analyses"][-1]["checks"] if c["name"] == "successRate")
        assert (rate["candidate"], rate["stable"], rate["threshold"]) == (1.0, 1.0, ">= 0.99")
        reasons = [e[1] for e in await h.events()]
        assert reasons.count("CanaryStepped") == 2 and "Promoted" in reasons
        h.kserve_reports(None)
        await h.reconcile()
        assert h.condition("Progressing") == ("False", "RolloutComplete") and h.condition("Degraded")[0] == "False"

    run({"steps": [10, 50, 100]}, scenario, registry)
    assert finished("Promoted") == before + 1


@pytest.mark.parametrize("mode", ["Standard", "Knative"])
def test_bad_version_is_rolled_back_and_not_retried(registry: str, mode: str) -> None:  # noqa: F811
    before = finished("RolledBack")

    async def scenario(h: Harness) -> None:
        h.prom.success["v2"] = 0.5
        h.edit_spec(model={"version": "v2"})
        await h.reconcile()
        h.kserve_reports(20)
        await h.reconcile()
        h.later(60)
        writes = await h.reconcile()
        spec = h.isvc()["spec"]
        if mode == "Standard":
            # The operator's gateway route (route.py) goes back to the one stable backend with the spec.
            assert writes == [("apply", "InferenceService", "fraud"), ("apply", "HTTPRoute", "fraud-traffic"),
                              ("status", "ModelDeployment", "fraud")]
            route = h.api.find("HTTPRoute", NS, "fraud-traffic")
            assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [
                ("fraud-v1-predictor", 100)]
            assert "canary" not in spec and spec["predictor"]["name"] == "v1"
            assert h.status()["rolloutPhase"] == "RolledBack"
        else:
            # KServe's order: the candidate to 0% first, the stable spec once KServe reports 0%.
            assert spec["predictor"]["canaryTrafficPercent"] == 0 and h.status()["rolloutPhase"] == "RollingBack"
            assert writes == [("apply", "InferenceService", "fraud"), ("status", "ModelDeployment", "fraud")]
            h.kserve_reports(0)
            await h.reconcile()
            spec = h.isvc()["spec"]
            assert "canaryTrafficPercent" not in spec["predictor"]
            env = {e["name"]: e["value"] for e in spec["predictor"]["containers"][0]["env"]}
            assert env["CONVEYOR_MODEL_VERSION"] == "v1"
        status = h.status()
        assert status["stableVersion"] == "v1" and "canaryVersion" not in status
        rejected = status["rejectedVersions"][0]
        assert (rejected["version"], rejected["check"], rejected["value"]) == ("v2", "successRate", 0.5)
        assert h.condition("Degraded") == ("True", "RolledBack")
        warning = next(e for e in await h.events() if e[1] == "RolledBack")
        assert warning[0] == "Warning" and "successRate" in warning[2]
        # Still wanted (Git says v2), never retried automatically ...
        h.kserve_reports(None)
        assert await h.reconcile() in ([], [("status", "ModelDeployment", "fraud")])
        assert "canaryVersion" not in h.status()
        # ... until a person asks.
        h.prom.success["v2"] = 1.0
        h.annotate("retry@1")
        await h.reconcile()
        assert h.status()["canaryVersion"] == "v2" and "rejectedVersions" not in h.status()
        assert h.status()["lastRolloutAction"] == "retry@1"

    spec = {"autoscaling": {"metric": "cpu", "target": 80}} if mode == "Standard" else {}
    run({"mode": mode, "steps": [20, 100], "analysis": {"failureLimit": 0}}, scenario, registry, **spec)
    assert finished("RolledBack") == before + 1


def test_pause_holds_and_queries_nothing_then_resumes(registry: str) -> None:  # noqa: F811
    async def scenario(h: Harness) -> None:
        h.edit_spec(model={"version": "v2"})
        await h.reconcile()
        h.kserve_reports(10)
        await h.reconcile()
        h.edit_spec(rollout={"paused": True})
        h.later(300)
        assert await h.reconcile() == [("status", "ModelDeployment", "fraud")]
        assert [q for q in h.prom.queries if "conveyor_requests_total" in q] == []  # no analysis
        assert h.status()["rolloutPhase"] == "Paused"
        assert h.condition("Progressing") == ("Unknown", "RolloutPaused")
        assert await h.reconcile() == []
        h.edit_spec(rollout={"paused": False})
        await h.reconcile()  # resumed: the step's hold starts over
        assert h.status()["rolloutPhase"] == "Progressing" and h.status()["canaryWeight"] == 10
        h.later(60)
        await h.reconcile()
        assert h.status()["canaryWeight"] == 50

    run({"steps": [10, 50, 100]}, scenario, registry)


def test_prometheus_down_is_never_a_pass_and_pauses(registry: str) -> None:  # noqa: F811
    async def scenario(h: Harness) -> None:
        h.prom.down = True
        h.edit_spec(model={"version": "v2"})
        await h.reconcile()
        h.kserve_reports(10)
        await h.reconcile()
        h.later(60)
        await h.reconcile()
        assert (h.status()["canaryWeight"], h.status()["analysisErrors"]) == (10, 1)
        h.later(10)  # retried sooner than an interval
        await h.reconcile()
        status = h.status()
        assert (status["rolloutPhase"], status["pauseReason"], status["canaryWeight"]) == ("Paused", "AnalysisErrors", 10)
        assert "unreachable" in status["analyses"][-1]["message"]
        # A person resumes once Prometheus is back.
        h.prom.down = False
        h.annotate("resume@2")
        await h.reconcile()
        h.later(60)
        await h.reconcile()
        assert h.status()["canaryWeight"] == 50

    run({"steps": [10, 50, 100], "analysis": {"consecutiveErrorLimit": 1}}, scenario, registry)


def test_manual_promote_and_abort_act_once(registry: str) -> None:  # noqa: F811
    async def scenario(h: Harness) -> None:
        h.edit_spec(model={"version": "v2"})
        await h.reconcile()
        h.annotate("promote@1")
        await h.reconcile()
        assert (h.status()["stableVersion"], h.status()["rolloutPhase"]) == ("v2", "Stable")
        assert "canaryTrafficPercent" not in h.isvc()["spec"]["predictor"]
        await h.reconcile()  # KServe has not observed the new spec yet: Ready turns False
        assert await h.reconcile() == []  # the same value does not act again
        assert [e[1] for e in await h.events()].count("Promoted") == 1
        # v1 again as a canary (Git), aborted by hand.
        h.edit_spec(model={"version": "v1"})
        await h.reconcile()
        assert h.status()["canaryVersion"] == "v1"
        h.annotate("abort@2")
        await h.reconcile()
        assert h.status()["rejectedVersions"][0]["check"] == "Aborted"

    run({"steps": [10, 50, 100]}, scenario, registry)
