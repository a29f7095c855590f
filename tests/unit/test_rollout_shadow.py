"""Shadow traffic, operator side (pure): the state machine's shadow stage, the agreement check, and the
two InferenceServices the plan asks for (the stable one mirroring, the shadow one serving the candidate)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.operator.modeldeployment.analysis import AGREEMENT, Target, judge, shadow_queries
from conveyor.operator.modeldeployment.plan import Resolution, plan_deployment
from conveyor.operator.modeldeployment.rollout import (
    PROGRESSING,
    ROLLED_BACK,
    STABLE,
    Analysis,
    CheckResult,
    Finished,
    Policy,
    RolloutState,
    Seen,
    next_step,
    state_from_status,
    state_to_status,
)
from conveyor.runtime.spec import AnalysisSpec, ModelDeploymentSpec

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
SHADOW = Policy(strategy="shadow", steps=(20, 50), interval=MIN, failure_limit=0)
PASS = Analysis("Passed", (CheckResult(AGREEMENT, "Passed", 0.99, None, ">= 0.95"),))
FAIL = Analysis("Failed", (CheckResult(AGREEMENT, "Failed", 0.4, None, ">= 0.95", "agreement 0.4"),))


def reasons(actions: list[Any]) -> list[str]:
    return [getattr(a, "reason", type(a).__name__) for a in actions]


def test_a_new_version_starts_in_shadow_and_holds_once_mirroring() -> None:
    state, actions = next_step(RolloutState(phase=STABLE, stable="v1"), None, NOW, policy=SHADOW, seen=Seen(wanted="v2"))
    assert (state.phase, state.canary, state.weight, state.shadow) == (PROGRESSING, "v2", 0, True)
    assert reasons(actions) == ["ShadowStarted"]
    # Not mirroring yet (reported None): no hold. Mirroring (reported 0): the hold starts.
    assert next_step(state, None, NOW, policy=SHADOW, seen=Seen(wanted="v2"))[0].step_start is None
    held, _ = next_step(state, None, NOW, policy=SHADOW, seen=Seen(wanted="v2", reported_weight=0))
    assert held.step_start == NOW and held.next_analysis == NOW + MIN


def test_a_passed_shadow_becomes_a_canary_or_is_promoted() -> None:
    due = RolloutState(phase=PROGRESSING, stable="v1", canary="v2", shadow=True, step_start=NOW - MIN, next_analysis=NOW)
    seen = Seen(wanted="v2", reported_weight=0)
    canary, actions = next_step(due, PASS, NOW, policy=SHADOW, seen=seen)
    assert (canary.shadow, canary.weight, canary.step, canary.step_start) == (False, 20, 0, None)
    assert "ShadowPassed" in reasons(actions)
    promoted, actions = next_step(due, PASS, NOW, policy=replace(SHADOW, shadow_then="promote"), seen=seen)
    assert (promoted.stable, promoted.canary, promoted.shadow) == ("v2", None, False)
    assert Finished("Promoted") in actions


def test_a_failed_shadow_is_rejected_at_once_in_both_modes() -> None:
    due = RolloutState(phase=PROGRESSING, stable="v1", canary="v2", shadow=True, step_start=NOW - MIN, next_analysis=NOW)
    for mode in ("Knative", "Standard"):  # no Knative 0% step: the shadow never took traffic
        state, actions = next_step(due, FAIL, NOW, policy=replace(SHADOW, mode=mode), seen=Seen(wanted="v2", reported_weight=0))
        assert (state.phase, state.stable, state.canary, state.shadow) == (ROLLED_BACK, "v1", None, False)
        assert Finished("RolledBack") in actions


def test_the_shadow_stage_round_trips_through_status() -> None:
    status: dict[str, Any] = {}
    state_to_status(RolloutState(phase=PROGRESSING, stable="v1", canary="v2", shadow=True), status)
    assert status["rolloutStage"] == "Shadow" and state_from_status(status).shadow
    state_to_status(RolloutState(phase=PROGRESSING, stable="v1", canary="v2", weight=20), status)
    assert "rolloutStage" not in status and not state_from_status(status).shadow


def test_agreement_is_read_from_the_mirror_and_judged_against_min_agreement() -> None:
    spec = AnalysisSpec.model_validate({"minAgreement": 0.95, "minSuccessRate": 0.9, "minRequests": 10, "window": "30s"})
    q = shadow_queries(spec, Target("ml", "fraud", "v2", "v1", shadow=True))
    assert 'shadow_version="v2"' in q[AGREEMENT] and 'result=~"agree"' in q[AGREEMENT]
    assert "dropped" not in q["requests"]
    low = judge(spec, {"requests": (50.0, None), "successRate": (1.0, None), AGREEMENT: (0.4, None)})
    assert low.verdict == "Failed" and low.culprit().name == AGREEMENT  # type: ignore[union-attr]
    high = judge(spec, {"requests": (50.0, None), "successRate": (1.0, None), AGREEMENT: (0.99, None)})
    assert high.verdict == "Passed"


def _md(status: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "conveyor.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "fraud", "namespace": "ml", "uid": "u", "generation": 2},
            "spec": {"model": {"registryUri": "file:///r", "name": "fraud", "version": "v2"},
                     "rollout": {"strategy": "shadow", "mode": "Standard", "shadow": {"percent": 30}},
                     "autoscaling": {"metric": "cpu", "target": 80}},
            "status": status}


def _env(isvc: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in isvc["spec"]["predictor"]["containers"][0]["env"]}


def test_the_plan_serves_the_shadow_apart_and_mirrors_once_it_is_ready() -> None:
    obj = _md({"stableVersion": "v1", "rolloutPhase": "Progressing", "canaryVersion": "v2", "canaryWeight": 0,
               "rolloutStage": "Shadow"})
    spec = ModelDeploymentSpec.model_validate(obj["spec"])

    def run(shadow_isvc: dict[str, Any] | None) -> Any:
        return plan_deployment(obj, spec, None, Resolution("v2", "pinned"), None, lambda v: f"file:///r/fraud/{v}", NOW,
                               shadow_isvc=shadow_isvc)

    first = run(None)
    shadow = first.shadow_service
    assert shadow is not None and shadow["metadata"]["name"] == "fraud-shadow"
    assert "--name" in (args := shadow["spec"]["predictor"]["containers"][0]["args"]) and "fraud-shadow" in args
    assert _env(shadow)["CONVEYOR_MODEL_VERSION"] == "v2"
    main = first.inference_service
    assert main is not None and not main["spec"].get("canary")  # callers only ever reach the stable version
    assert "CONVEYOR_SHADOW_URL" not in _env(main)  # the shadow has no address yet
    assert first.status["shadow"] == {"version": "v2", "percent": 30, "mirroring": False}

    ready = {**shadow, "metadata": {**shadow["metadata"], "generation": 1},
             "status": {"observedGeneration": 1, "address": {"url": "http://fraud-shadow.ml.svc.cluster.local"},
                        "conditions": [{"type": "Ready", "status": "True"}]}}
    second = run(ready)
    assert second.shadow_service is None
    env = _env(second.inference_service)  # type: ignore[arg-type]
    assert (env["CONVEYOR_SHADOW_URL"], env["CONVEYOR_SHADOW_MODEL"], env["CONVEYOR_SHADOW_VERSION"],
            env["CONVEYOR_SHADOW_PERCENT"]) == ("http://fraud-shadow.ml.svc.cluster.local", "fraud-shadow", "v2", "30")

    # The candidate leaves the shadow (rolled back here): the shadow InferenceService is deleted.
    done = _md({"stableVersion": "v1", "rolloutPhase": "RolledBack", "rejectedVersions": [{"version": "v2"}]})
    after = plan_deployment(done, spec, None, Resolution("v2", "pinned"), None, lambda v: f"file:///r/fraud/{v}", NOW,
                            shadow_isvc=ready)
    assert after.delete_shadow is ready and "shadow" not in after.status
