"""ModelDeployment planning, pure: which version is stable/canary, the InferenceService, status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.operator.controller import conditions as c
from conveyor.operator.controller.children import ANNOTATION_APPLIED_HASH
from conveyor.operator.modeldeployment.plan import (
    DeploymentPlan,
    Resolution,
    observed_traffic,
    plan_deployment,
    reported_weight,
    spec_observed,
)
from conveyor.runtime.spec import ModelDeploymentSpec

NOW = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)


def uri(v: str) -> str:
    return f"file:///r/fraud/{v}"


def md(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body = {"model": {"registryUri": "file:///r", "name": "fraud"}}
    body.update(spec)
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "fraud", "namespace": "ml", "uid": "u", "generation": 3},
        "spec": body,
        "status": status or {},
    }


def plan(obj: dict[str, Any], version: str | None, isvc: dict[str, Any] | None = None, **res: Any) -> DeploymentPlan:
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    return plan_deployment(obj, spec, None, Resolution(version, "test", **res), isvc, uri, NOW)


def applied(p: DeploymentPlan, ready: bool | None = None, **status: Any) -> dict[str, Any]:
    """The InferenceService as the apiserver would hold it after the plan's apply (and KServe's status)."""
    assert p.inference_service is not None
    isvc = {**p.inference_service, "metadata": {**p.inference_service["metadata"], "generation": 1}}
    st = dict(status)
    if ready is not None:
        st.setdefault("conditions", [{"type": "Ready", "status": "True" if ready else "False", "reason": "R"}])
    isvc["status"] = st
    return isvc


def cond(p: DeploymentPlan, type_: str) -> tuple[str, str]:
    x = c.get_condition(p.status["conditions"], type_)
    assert x is not None
    return x["status"], x["reason"]


def env(isvc: dict[str, Any], canary: bool = False) -> dict[str, str]:
    pred = isvc["spec"]["canary"][0]["predictor"] if canary else isvc["spec"]["predictor"]
    return {e["name"]: e["value"] for e in pred["containers"][0]["env"]}


def test_first_version_becomes_stable() -> None:
    p = plan(md(), "v1")
    assert p.inference_service is not None and env(p.inference_service)["STORAGE_URI"] == uri("v1")
    assert p.status["stableVersion"] == "v1" and "canaryVersion" not in p.status
    assert p.status["rolloutPhase"] == "Stable" and p.status["inferenceService"] == "fraud"
    assert cond(p, c.READY) == ("False", "Updating") and cond(p, c.PROGRESSING)[0] == "True"
    assert {x["type"] for x in p.status["conditions"]} == set(c.DEPLOYMENT_CONDITIONS)
    assert cond(p, c.DRIFTED)[0] == "Unknown"


def test_ready_isvc_makes_ready_and_nothing_is_written_again() -> None:
    p = plan(md(), "v1")
    isvc = applied(p, ready=True, url="http://fraud.ml.example.com")
    settled = plan({**md(), "status": p.status}, "v1", isvc)
    assert settled.inference_service is None  # unchanged: no apply
    assert cond(settled, c.READY) == ("True", "InferenceServiceReady")
    assert cond(settled, c.PROGRESSING) == ("False", "RolloutComplete")
    assert settled.status["url"] == "http://fraud.ml.example.com"
    again = plan({**md(), "status": settled.status}, "v1", isvc)
    assert again.inference_service is None and again.status == settled.status and again.events == []


@pytest.mark.parametrize("mode", ["Knative", "Standard"])
def test_new_version_with_canary_strategy_starts_at_first_step(mode: str) -> None:
    spec: dict[str, Any] = {"rollout": {"mode": mode, "steps": [20, 60, 100]}}
    if mode == "Standard":
        spec["autoscaling"] = {"metric": "cpu", "target": 80}
    p1 = plan(md(**spec), "v1")
    isvc = applied(p1, ready=True)
    p2 = plan(md(status=p1.status, **spec), "v2", isvc)
    assert (p2.status["stableVersion"], p2.status["canaryVersion"], p2.status["canaryWeight"]) == ("v1", "v2", 20)
    assert p2.status["candidateVersion"] == "v2" and p2.status["rolloutPhase"] == "Progressing"
    assert p2.status["rolloutStep"] == 0
    new = p2.inference_service
    assert new is not None
    if mode == "Knative":
        assert new["spec"]["predictor"]["canaryTrafficPercent"] == 20 and env(new)["STORAGE_URI"] == uri("v2")
    else:
        assert new["spec"]["canary"][0]["trafficPercent"] == 20
        assert env(new)["STORAGE_URI"] == uri("v1") and env(new, canary=True)["STORAGE_URI"] == uri("v2")
    assert cond(p2, c.PROGRESSING) == ("True", "CanaryInProgress")
    assert ("Normal", "CanaryStarted") in [e[:2] for e in p2.events]
    assert p2.status["traffic"] == [
        {"version": "v1", "percent": 80, "tag": "stable"},
        {"version": "v2", "percent": 20, "tag": "canary"},
    ]


def test_a_served_version_status_never_recorded_is_canaried_against_not_replaced() -> None:
    """The InferenceService serves v1, but status never said so (v2 was applied between the ISVC's create
    and the status write, which the resourceVersion guard refused; or a restore dropped status): v2 is a
    canary beside v1, not a replacement. Another deployment's InferenceService of that name is not taken."""
    isvc = applied(plan(md(), "v1"), ready=True)
    p = plan(md(), "v2", isvc)
    assert (p.status["stableVersion"], p.status["canaryVersion"], p.status["canaryWeight"]) == ("v1", "v2", 10)
    assert p.inference_service is not None and env(p.inference_service)["STORAGE_URI"] == uri("v2")
    assert p.inference_service["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert ("Normal", "VersionDeployed") not in [e[:2] for e in p.events]
    foreign = {**isvc, "metadata": {**isvc["metadata"], "ownerReferences": [
        {**isvc["metadata"]["ownerReferences"][0], "uid": "an-earlier-fraud"}]}}
    p = plan(md(), "v2", foreign)
    assert p.status["stableVersion"] == "v2" and "canaryVersion" not in p.status


def test_weight_set_by_the_rollout_is_kept() -> None:
    p1 = plan(md(), "v1")
    p2 = plan(md(status=p1.status), "v2", applied(p1, ready=True))
    status = {**p2.status, "canaryWeight": 50}  # the rollout state machine stepped
    p3 = plan(md(status=status), "v2", applied(p2, ready=True))
    assert p3.inference_service is not None
    assert p3.inference_service["spec"]["predictor"]["canaryTrafficPercent"] == 50
    assert p3.status["canaryWeight"] == 50


def test_immediate_strategy_replaces_stable() -> None:
    p1 = plan(md(rollout={"strategy": "immediate"}), "v1")
    p2 = plan(md(status=p1.status, rollout={"strategy": "immediate"}), "v2", applied(p1, ready=True))
    assert p2.status["stableVersion"] == "v2" and "canaryVersion" not in p2.status
    assert p2.inference_service is not None and "canaryTrafficPercent" not in p2.inference_service["spec"]["predictor"]


def test_wanting_stable_again_drops_the_canary() -> None:
    p1 = plan(md(), "v1")
    p2 = plan(md(status=p1.status), "v2", applied(p1, ready=True))
    p3 = plan(md(status=p2.status), "v1", applied(p2, ready=True))
    assert "canaryVersion" not in p3.status and p3.status["rolloutPhase"] == "Stable"
    assert ("Normal", "CanaryDropped") in [e[:2] for e in p3.events]


def test_no_version_yet() -> None:
    p = plan(md(), None, reason="AwaitingModel", message="Waiting for MLPipeline fraud.")
    assert p.inference_service is None and "stableVersion" not in p.status
    assert cond(p, c.READY) == ("False", "AwaitingModel")
    assert cond(p, c.DEGRADED) == ("False", "AsExpected")


def test_missing_pinned_version_degrades_but_keeps_serving() -> None:
    p1 = plan(md(), "v1")
    p2 = plan(
        md(status=p1.status, model={"registryUri": "file:///r", "name": "fraud", "version": "v9"}),
        None,
        applied(p1, ready=True),
        reason="VersionNotFound",
        message="spec.model.version v9 is not a committed version",
        degraded=True,
    )
    assert p2.inference_service is None and p2.status["stableVersion"] == "v1"
    assert cond(p2, c.DEGRADED) == ("True", "VersionNotFound")
    assert ("Warning", "VersionNotFound") in [e[:2] for e in p2.events]


def test_model_load_failure_is_degraded() -> None:
    p1 = plan(md(), "v1")
    isvc = applied(p1, ready=False, modelStatus={"transitionStatus": "BlockedByFailedLoad", "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "bad weights"}})
    p2 = plan(md(status=p1.status), "v1", isvc)
    assert cond(p2, c.DEGRADED) == ("True", "ModelLoadFailed") and cond(p2, c.READY)[0] == "False"


def test_stale_isvc_status_is_not_ready() -> None:
    p1 = plan(md(), "v1")
    isvc = applied(p1, ready=True, observedGeneration=0)
    p2 = plan(md(status=p1.status), "v1", isvc)
    assert cond(p2, c.READY) == ("False", "InferenceServiceUpdating")


def _standard_isvc(generation: int, canary: dict[str, int], statuses: dict[str, int]) -> dict[str, Any]:
    """A Standard-mode InferenceService as the real KServe v0.20.0 reports it: observedGeneration is the
    stable predictor Deployment's (here stuck at 2 while ours moves on), canaryStatuses rebuilt from the
    spec it last reconciled."""
    return {
        "metadata": {"name": "fraud", "generation": generation,
                     "annotations": {"serving.kserve.io/deploymentMode": "Standard"}},
        "spec": {"predictor": {"name": "v1"},
                 "canary": [{"predictor": {"name": n}, "trafficPercent": w} for n, w in canary.items()]},
        "status": {"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True"}],
                   "canaryStatuses": [{"name": n, "trafficPercent": w, "ready": True} for n, w in statuses.items()]},
    }


def test_standard_mode_observed_from_canary_statuses_not_the_deployments_generation() -> None:
    # A step from 25% to 50% at minReplicas 1 leaves the stable Deployment as it was: its generation (2),
    # which KServe reports as the InferenceService's, never reaches ours (4). KServe acted on the step once
    # its canaryStatuses say 50.
    acted = _standard_isvc(4, {"v2": 50}, {"v2": 50})
    assert spec_observed(acted) and reported_weight(acted, "Standard", "v2") == 50
    not_yet = _standard_isvc(4, {"v2": 50}, {"v2": 25})
    assert not spec_observed(not_yet) and reported_weight(not_yet, "Standard", "v2") is None
    promoted_not_yet = _standard_isvc(5, {}, {"v2": 100})
    assert not spec_observed(promoted_not_yet)
    assert spec_observed(_standard_isvc(5, {}, {}))
    # Knative keeps the generation rule: KServe copies the Knative Service's, which moves with every spec.
    knative = {"metadata": {"generation": 4, "annotations": {"serving.kserve.io/deploymentMode": "Knative"}},
               "status": {"observedGeneration": 3}}
    assert not spec_observed(knative)
    assert spec_observed({**knative, "status": {"observedGeneration": 4}})


def test_invalid_spec_writes_no_child_and_warns_once() -> None:
    obj = md(rollout={"mode": "Standard"})  # metric concurrency: HPA cannot
    p = plan(obj, "v1")
    assert p.inference_service is None
    status, reason = cond(p, c.ACCEPTED)
    assert (status, reason) == ("False", "InvalidSpec")
    assert "spec.autoscaling.metric" in c.get_condition(p.status["conditions"], c.ACCEPTED)["message"]
    assert [e[1] for e in p.events] == ["InvalidSpec"]
    again = plan({**obj, "status": p.status}, "v1")
    assert again.events == [] and again.status == p.status


def test_observed_traffic_from_kserve_status() -> None:
    knative = {"status": {"components": {"predictor": {"traffic": [
        {"revisionName": "fraud-predictor-00002", "percent": 10, "latestRevision": True},
        {"revisionName": "fraud-predictor-00001", "percent": 90, "latestRevision": False, "tag": "prev"},
    ]}}}}
    assert observed_traffic(knative, "Knative", "v1", "v2", 10) == [
        {"version": "v2", "percent": 10, "revision": "fraud-predictor-00002", "tag": "canary"},
        {"version": "v1", "percent": 90, "revision": "fraud-predictor-00001", "tag": "stable"},
    ]
    standard = {"status": {"conditions": [], "canaryStatuses": [{"name": "v2", "trafficPercent": 30, "ready": True}]}}
    assert observed_traffic(standard, "Standard", "v1", "v2", 30) == [
        {"version": "v1", "percent": 70, "revision": "stable", "tag": "stable"},
        {"version": "v2", "percent": 30, "revision": "v2", "tag": "canary"},
    ]


def test_hash_annotation_drives_reapply() -> None:
    p1 = plan(md(), "v1")
    isvc = applied(p1, ready=True)
    isvc["metadata"]["annotations"] = {**isvc["metadata"]["annotations"], ANNOTATION_APPLIED_HASH: "stale"}
    p2 = plan(md(status=p1.status), "v1", isvc)
    assert p2.inference_service is not None  # someone changed it: put ours back


def test_hand_edited_owned_field_is_reapplied_extra_fields_are_not() -> None:
    p1 = plan(md(), "v1")
    isvc = applied(p1, ready=True)
    isvc["spec"]["predictor"]["containerConcurrency"] = 0  # defaulted by someone else: fine
    isvc["metadata"]["labels"]["team"] = "a"
    assert plan(md(status=p1.status), "v1", isvc).inference_service is None
    isvc["spec"]["predictor"]["maxReplicas"] = 99  # ours, changed by hand
    assert plan(md(status=p1.status), "v1", isvc).inference_service is not None
