"""ModelDeployment reconcile logic, pure: (deployment, resolved version, its InferenceService) -> plan.

Hand-off from a pipeline (GitOps-friendly: nothing writes to the ModelDeployment's spec or metadata).
A ModelDeployment whose `spec.model.version` is `latest` follows a pipeline's gate: the version it
wants is the pipeline's `status.latestVersion` (the newest version that passed the gate). The pipeline
is `spec.model.pipeline`, or else the one MLPipeline in the namespace whose `spec.deploy.modelDeployment`
names this deployment. Git keeps `version: latest` and never drifts; the operator re-reconciles the
deployment whenever the pipeline's status changes. A ModelDeployment that pins a version (`v3`) serves
exactly that version, and the pipeline reports the hand-off as refused (Warning `DeploymentPinned`).
With `latest` and no pipeline at all it follows the registry's newest committed version (polled every
minute: a registry announces nothing).

Rollout. The first version becomes `status.stableVersion` directly. A later wanted version:
- strategy `immediate`: replaces the stable version in place;
- strategy `canary`: becomes `status.canaryVersion` at the first step's weight (`spec.rollout.steps[0]`)
  beside the stable one (see build.py for how each KServe mode splits traffic). Stepping, analysis,
  promotion and rollback are the rollout state machine's (a later issue): it moves
  `status.canaryWeight`/`stableVersion`, and this module builds whatever those say.
If the wanted version returns to the stable one while a canary runs (a Git revert), the canary is
dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.operator.controller import conditions as c
from conveyor.operator.controller.children import needs_apply
from conveyor.operator.controller.events import Event
from conveyor.operator.controller.times import rfc3339
from conveyor.operator.controller.validation import InvalidSpecError
from conveyor.operator.modeldeployment.build import build_inference_service
from conveyor.operator.modeldeployment.validate import validate_deployment, validate_version, with_kserve_mode
from conveyor.runtime.spec import ModelDeploymentSpec

STABLE = "Stable"
PROGRESSING = "Progressing"

# KServe model states that mean the model will not come up without a change.
_FAILED_TRANSITIONS = {"BlockedByFailedLoad", "InvalidSpec"}


@dataclass(frozen=True)
class Resolution:
    """The version the spec asks for, as the handler resolved it (I/O: pipeline status, registry)."""

    version: str | None
    source: str  # e.g. "pinned", "pipeline fraud", "registry"
    reason: str = ""  # when version is None or unusable: CamelCase
    message: str = ""
    degraded: bool = False  # a problem that will not fix itself (a pinned version that does not exist)


@dataclass
class DeploymentPlan:
    status: dict[str, Any]
    inference_service: dict[str, Any] | None = None  # desired manifest; None: leave it as it is
    events: list[Event] = field(default_factory=list)


def _isvc_ready(isvc: dict[str, Any] | None) -> tuple[bool, str, str]:
    if isvc is None:
        return False, "InferenceServiceMissing", "The InferenceService does not exist yet."
    st = isvc.get("status") or {}
    gen = isvc["metadata"].get("generation")
    observed = st.get("observedGeneration")
    ready = c.get_condition(st.get("conditions"), "Ready")
    if observed is not None and gen is not None and observed < gen:
        return False, "InferenceServiceUpdating", "KServe has not yet observed the latest InferenceService spec."
    if ready is None:
        return False, "InferenceServiceNotReady", "KServe reports no readiness yet."
    if ready.get("status") == c.TRUE:
        return True, "InferenceServiceReady", "The InferenceService is ready."
    return False, ready.get("reason") or "InferenceServiceNotReady", ready.get("message") or "Not ready."


def _isvc_failure(isvc: dict[str, Any] | None) -> str | None:
    if isvc is None:
        return None
    st = isvc.get("status") or {}
    model = st.get("modelStatus") or {}
    info = model.get("lastFailureInfo") or {}
    if model.get("transitionStatus") in _FAILED_TRANSITIONS or info:
        return info.get("message") or info.get("reason") or f"model {model.get('transitionStatus')}"
    return None


def observed_traffic(
    isvc: dict[str, Any] | None, mode: str, stable: str | None, canary: str | None, weight: int
) -> list[dict[str, Any]]:
    """The traffic split per version, from the InferenceService's status where KServe reports it."""
    if stable is None:
        return []
    st = (isvc or {}).get("status") or {}
    if mode == "Knative":
        entries = ((st.get("components") or {}).get("predictor") or {}).get("traffic") or []
        if entries:
            out = []
            for e in entries:
                latest = bool(e.get("latestRevision"))
                version = canary if (latest and canary) else stable
                out.append(
                    {
                        "version": version,
                        "percent": int(e.get("percent") or 0),
                        "revision": e.get("revisionName", ""),
                        "tag": "canary" if (latest and canary) else "stable",
                    }
                )
            return out
    else:
        canaries = st.get("canaryStatuses") or []
        if canaries or (st.get("conditions") and canary is None):
            out = []
            total = 0
            for e in canaries:
                pct = int(e.get("trafficPercent") or 0)
                total += pct
                out.append({"version": canary or e.get("name", ""), "percent": pct, "revision": e.get("name", ""), "tag": "canary"})
            return [{"version": stable, "percent": 100 - total, "revision": "stable", "tag": "stable"}, *out]
    # KServe has not reported a split yet: the split the spec asks for.
    if canary:
        return [
            {"version": stable, "percent": 100 - weight, "tag": "stable"},
            {"version": canary, "percent": weight, "tag": "canary"},
        ]
    return [{"version": stable, "percent": 100, "tag": "stable"}]


def plan_deployment(
    deployment: dict[str, Any],
    spec: ModelDeploymentSpec | None,
    invalid: str | None,
    resolution: Resolution | None,
    isvc: dict[str, Any] | None,
    uri_for: Callable[[str], str],
    now: datetime,
) -> DeploymentPlan:
    if spec is not None:  # the handler settles it with the operator's configured default first
        spec = with_kserve_mode(spec, isvc)
    meta = deployment["metadata"]
    generation = meta.get("generation")
    status: dict[str, Any] = json.loads(json.dumps(deployment.get("status") or {}))
    status["observedGeneration"] = generation
    status["inferenceService"] = meta["name"]
    ts = rfc3339(now)
    plan = DeploymentPlan(status=status)
    conds: list[dict[str, Any]] = status.setdefault("conditions", [])
    c.ensure_conditions(conds, c.DEPLOYMENT_CONDITIONS, generation=generation, now=ts)

    def put(type_: str, st: str, reason: str, message: str) -> bool:
        return c.set_condition(conds, type_, st, reason, message, generation=generation, now=ts)

    if spec is not None and invalid is None:
        try:
            validate_deployment(spec)
        except InvalidSpecError as e:
            invalid = str(e)
    if spec is None or invalid is not None:
        return _reject(plan, put, isvc, invalid or "invalid spec")
    wanted = resolution.version if resolution else None
    stable, canary, weight = _next_versions(plan, spec, resolution, ts)
    try:
        for version in filter(None, (stable, canary)):
            validate_version(version)
    except InvalidSpecError as e:
        plan.events.clear()
        return _reject(plan, put, isvc, str(e))
    put(c.ACCEPTED, c.TRUE, "Valid", "The spec is valid.")
    if stable is not None:
        desired = build_inference_service(
            deployment,
            spec,
            stable=(stable, uri_for(stable)),
            candidate=(canary, uri_for(canary)) if canary else None,
            weight=weight,
        )
        if needs_apply(desired, isvc):
            plan.inference_service = desired
        status["stableVersion"] = stable
    _record_versions(status, stable, canary, weight, wanted)
    status["traffic"] = observed_traffic(isvc, spec.rollout.mode, stable, canary, weight)
    _set_conditions(plan, put, isvc, resolution, stable, canary, weight)
    _mirror_url(status, isvc)
    return plan


def _reject(plan: DeploymentPlan, put: Callable[..., bool], isvc: dict[str, Any] | None, message: str) -> DeploymentPlan:
    """An invalid spec: say so, and leave the InferenceService as it is (still reporting what it does)."""
    if put(c.ACCEPTED, c.FALSE, "InvalidSpec", message):
        plan.events.append(("Warning", "InvalidSpec", message))
    put(c.PROGRESSING, c.FALSE, "InvalidSpec", "Nothing is rolled out until the spec is fixed.")
    ready, reason, ready_message = _isvc_ready(isvc)
    put(c.READY, c.TRUE if ready else c.FALSE, reason, ready_message)
    _mirror_url(plan.status, isvc)
    return plan


def _next_versions(
    plan: DeploymentPlan, spec: ModelDeploymentSpec, resolution: Resolution | None, ts: str
) -> tuple[str | None, str | None, int]:
    """(stable, canary, weight) once the wanted version is taken in (the module docstring's rules)."""
    status = plan.status
    stable = status.get("stableVersion")
    canary = status.get("canaryVersion")
    weight = int(status.get("canaryWeight") or 0)
    wanted = resolution.version if resolution else None
    if wanted is None or wanted == canary:
        return stable, canary, weight
    if stable is None:
        plan.events.append(("Normal", "VersionDeployed", f"serving {wanted} ({resolution.source})"))  # type: ignore[union-attr]
        return wanted, None, 0
    if wanted == stable:
        if canary is not None:
            plan.events.append(("Normal", "CanaryDropped", f"{canary} dropped: the wanted version is {stable} again"))
        return stable, None, 0
    if spec.rollout.strategy == "immediate":
        plan.events.append(("Normal", "VersionReplaced", f"{wanted} replaces {stable} (immediate)"))
        return wanted, None, 0
    weight = spec.rollout.steps[0]
    status["rolloutStep"] = 0
    status["stepStartTime"] = ts
    status["failedAnalyses"] = 0
    plan.events.append(("Normal", "CanaryStarted", f"{wanted} takes {weight}% beside {stable} ({spec.rollout.mode} mode)"))
    return stable, wanted, weight


def _record_versions(status: dict[str, Any], stable: str | None, canary: str | None, weight: int, wanted: str | None) -> None:
    for key, value in (("canaryVersion", canary), ("canaryWeight", weight if canary else None)):
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    if wanted is not None and wanted != stable:
        status["candidateVersion"] = wanted
    else:
        status.pop("candidateVersion", None)
    if canary is None:
        for key in ("rolloutStep", "stepStartTime", "failedAnalyses"):
            status.pop(key, None)
    if stable is not None:
        status["rolloutPhase"] = PROGRESSING if canary else STABLE


def _set_conditions(
    plan: DeploymentPlan,
    put: Callable[..., bool],
    isvc: dict[str, Any] | None,
    resolution: Resolution | None,
    stable: str | None,
    canary: str | None,
    weight: int,
) -> None:
    ready, ready_reason, ready_message = _isvc_ready(isvc)
    up_to_date = plan.inference_service is None
    if stable is None:
        reason = resolution.reason if resolution and resolution.reason else "NoModelVersion"
        message = resolution.message if resolution and resolution.message else "No model version to serve yet."
        put(c.READY, c.FALSE, reason, message)
        put(c.PROGRESSING, c.FALSE, reason, message)
    else:
        if ready and up_to_date:
            put(c.READY, c.TRUE, ready_reason, f"Serving {stable}" + (f" with {canary} at {weight}%." if canary else "."))
        elif not up_to_date:
            put(c.READY, c.FALSE, "Updating", "Applying the InferenceService spec.")
        else:
            put(c.READY, c.FALSE, ready_reason, ready_message)
        if canary:
            put(c.PROGRESSING, c.TRUE, "CanaryInProgress", f"{canary} at {weight}% beside {stable}.")
        elif not up_to_date or not ready:
            put(c.PROGRESSING, c.TRUE, "Reconciling", f"Rolling out {stable}.")
        else:
            put(c.PROGRESSING, c.FALSE, "RolloutComplete", f"{stable} serves all traffic.")
    failure = _isvc_failure(isvc)
    if resolution is not None and resolution.degraded:
        if put(c.DEGRADED, c.TRUE, resolution.reason or "ModelUnavailable", resolution.message):
            plan.events.append(("Warning", resolution.reason or "ModelUnavailable", resolution.message))
    elif failure is not None:
        if put(c.DEGRADED, c.TRUE, "ModelLoadFailed", failure):
            plan.events.append(("Warning", "ModelLoadFailed", failure))
    else:
        put(c.DEGRADED, c.FALSE, "AsExpected", "No failure reported.")


def _mirror_url(status: dict[str, Any], isvc: dict[str, Any] | None) -> None:
    url = ((isvc or {}).get("status") or {}).get("url")
    if url:
        status["url"] = url
    else:
        status.pop("url", None)
