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

Rollout. The state lives in status (stableVersion, canaryVersion, canaryWeight, rolloutPhase, ...);
each reconcile feeds it to the pure state machine (rollout.py) with what the cluster shows (the wanted
version, rejected versions, the weight KServe reports, spec.rollout.paused, a one-shot
`conveyor.dev/rollout-action` annotation) and the analysis the handler took when one was due; this
module then builds the InferenceService the new state says (build.py: how each KServe mode splits
traffic) and records events, analyses and rejected versions.

Shadow (strategy shadow): while the candidate is a shadow, the plan also holds the shadow
InferenceService (`<name>-shadow`, build.build_shadow_service); once KServe reports it Ready with an
address, the stable predictor gets that address (build.ShadowTarget) and mirrors to it. The shadow's
hold begins when both are Ready with the mirror in place (reported as weight 0); when the candidate
leaves the shadow (a canary, promoted, rolled back) the shadow InferenceService is deleted.

A/B/N (strategy abn): instead of the rollout state machine, `_experiment` serves
`rollout.experiment.versions` at their weights (build.build_experiment_service) and steps the
experiment (experiment.py) with the figures the handler read when due; status.experiment holds them and
the verdict, and a significant winner is promoted with `autoPromote`.

Manual actions: the annotation `conveyor.dev/rollout-action: <promote|abort|resume|retry>[@token]`
acts once per distinct value (status.lastRolloutAction records the value acted on; `kubectl conveyor`
writes `<action>@<time>`), so Argo CD or a person can set it again with a new token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.operator.controller import conditions as c
from conveyor.operator.controller.children import needs_apply
from conveyor.operator.controller.events import Event
from conveyor.operator.controller.times import rfc3339
from conveyor.operator.controller.validation import InvalidSpecError
from conveyor.operator.modeldeployment import experiment
from conveyor.operator.modeldeployment.build import (
    ANNOTATION_EXPERIMENT,
    ANNOTATION_STABLE_VERSION,
    KSERVE_DEPLOYMENT_MODE,
    ShadowTarget,
    build_experiment_service,
    build_inference_service,
    build_shadow_service,
    predictor_name,
    shadow_service_name,
)
from conveyor.operator.modeldeployment.compat import Compatibility, hold_back
from conveyor.operator.modeldeployment.drift import DriftReading
from conveyor.operator.modeldeployment.drift import record as record_drift
from conveyor.operator.modeldeployment.experiment import Figures
from conveyor.operator.modeldeployment.rollout import (
    ACTIONS,
    PAUSED,
    ROLLED_BACK,
    ROLLING_BACK,
    Analysed,
    Analysis,
    Emit,
    Finished,
    Rejected,
    RolloutState,
    Seen,
    Unrejected,
    next_step,
    parse_duration,
    policy_for,
    state_from_status,
    state_to_status,
)
from conveyor.operator.modeldeployment.route import (
    NO_ROUTE_MESSAGE,
    build_route,
    carried_traffic,
    cluster_local,
    effective_backends,
    hostname,
    owned_by,
    route_name,
)
from conveyor.operator.modeldeployment.validate import validate_deployment, validate_version, with_kserve_mode
from conveyor.runtime.spec import DEFAULT_KSERVE_MODE, ModelDeploymentSpec

ANNOTATION_ROLLOUT_ACTION = "conveyor.dev/rollout-action"
KEEP_ANALYSES = 5
KEEP_REJECTED = 10

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
    finished: list[str] = field(default_factory=list)  # rollout outcomes (Promoted, RolledBack, Aborted)
    shadow_service: dict[str, Any] | None = None  # the shadow InferenceService to apply (strategy shadow)
    delete_shadow: dict[str, Any] | None = None  # the shadow InferenceService to delete (no shadow any more)
    route: dict[str, Any] | None = None  # Standard mode: the weighted HTTPRoute to apply (route.py)
    delete_routes: list[dict[str, Any]] = field(default_factory=list)  # HTTPRoutes no longer wanted


@dataclass(frozen=True)
class Routing:
    """Standard mode's gateway route, as the handler found it: `gateway` (namespace, name) from
    --standard-gateway (None: off), `routes` the HTTPRoutes labelled with the deployment (ours and any
    KServe wrote); None when the cluster serves no HTTPRoute resource (or the mode is Knative)."""

    gateway: tuple[str, str] | None
    routes: list[dict[str, Any]] | None

    @property
    def active(self) -> bool:
        return self.gateway is not None and self.routes is not None


def spec_observed(isvc: dict[str, Any]) -> bool:
    """KServe has acted on the InferenceService's latest spec, judged by what it reports for the mode.

    Knative: `status.observedGeneration` is the Knative Service's, which KServe rewrites with every spec
    it is given, so it keeps pace with ours. Standard: KServe v0.20.0 copies a predictor Deployment's
    observedGeneration there (its source: `PropagateRawStatus`), another object's counter, which says
    nothing about our spec: ahead of ours (the HPA's scaling moves it) it passes a step KServe has not
    seen, behind it it would hold one for ever. There the fact is `status.canaryStatuses`, which KServe
    rebuilds from the spec's `canary[]` on every reconcile: observed when it names exactly the spec's
    canaries with their `trafficPercent` (none after a promotion or rollback).
    """
    st = isvc.get("status") or {}
    annotations = isvc["metadata"].get("annotations") or {}
    if annotations.get(KSERVE_DEPLOYMENT_MODE) in ("Standard", "RawDeployment"):
        wanted = {(e.get("predictor") or {}).get("name"): int(e.get("trafficPercent") or 0)
                  for e in (isvc.get("spec") or {}).get("canary") or []}
        seen = {e.get("name"): int(e.get("trafficPercent") or 0) for e in st.get("canaryStatuses") or []}
        return seen == wanted
    gen, observed = isvc["metadata"].get("generation"), st.get("observedGeneration")
    return observed is None or gen is None or observed >= gen


def _isvc_ready(isvc: dict[str, Any] | None) -> tuple[bool, str, str]:
    if isvc is None:
        return False, "InferenceServiceMissing", "The InferenceService does not exist yet."
    st = isvc.get("status") or {}
    ready = c.get_condition(st.get("conditions"), "Ready")
    if not spec_observed(isvc):
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
    analysis: Analysis | None = None,
    drift_reading: DriftReading | None = None,
    compatibility: Compatibility | None = None,
    shadow_isvc: dict[str, Any] | None = None,
    experiment_reading: ExperimentReading | None = None,
    routing: Routing | None = None,
) -> DeploymentPlan:
    """`analysis`: the one the handler took because status said it was due (None otherwise); likewise
    `drift_reading` (drift.py), recorded in status.drift and the Drifted condition, and
    `experiment_reading` (strategy abn: the figures per version, experiment.py). `shadow_isvc`: the
    shadow InferenceService as it exists (strategy shadow). `routing`: Standard mode's gateway route
    (route.py); None: KServe exposes the InferenceService itself."""
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
    standard = (spec.rollout.mode or DEFAULT_KSERVE_MODE) != "Knative"
    routed = standard and routing is not None and routing.active
    if spec.rollout.strategy == "abn" and spec.rollout.experiment is not None:
        try:
            for v in spec.rollout.experiment.versions:
                validate_version(v.version)
        except InvalidSpecError as e:
            return _reject(plan, put, isvc, str(e).replace("spec.model.version", "spec.rollout.experiment.versions"))
        _experiment(plan, deployment, spec, isvc, uri_for, now, experiment_reading, put, routed)
        _route(plan, deployment, isvc, routing if standard else None, _served_versions(plan.status))
        if routed:
            _traffic_from_route(plan.status, deployment, routing)
        if shadow_isvc is not None:
            plan.delete_shadow = shadow_isvc
        _mirror_url(status, isvc)
        record_drift(status, plan.events, drift_reading, spec, generation=generation)
        return plan
    if status.pop("experiment", None) is not None and status.get("rolloutPhase") == "Experiment":
        status["rolloutPhase"] = "Stable"  # the experiment's first version (or its winner) serves on
    wanted = hold_back(conds, plan.events, resolution.version if resolution else None, compatibility, put)
    state = _roll(plan, deployment, spec, isvc, wanted, analysis, now, shadow_isvc)
    try:
        for version in filter(None, (state.stable, state.canary)):
            validate_version(version)
    except InvalidSpecError as e:
        plan = DeploymentPlan(status=status)
        return _reject(plan, put, isvc, str(e))
    put(c.ACCEPTED, c.TRUE, "Valid", "The spec is valid.")
    _serve(plan, deployment, spec, isvc, uri_for, state, wanted, shadow_isvc, routed)
    _route(plan, deployment, isvc, routing if standard else None, _served_versions(plan.status), shadow_isvc)
    if routed:
        _traffic_from_route(plan.status, deployment, routing)
    _set_conditions(plan, put, isvc, resolution, state, unrouted=standard and not routed)
    _mirror_url(status, isvc)
    record_drift(status, plan.events, drift_reading, spec, generation=generation)
    return plan


def _serve(
    plan: DeploymentPlan,
    deployment: dict[str, Any],
    spec: ModelDeploymentSpec,
    isvc: dict[str, Any] | None,
    uri_for: Callable[[str], str],
    state: RolloutState,
    wanted: str | None,
    shadow_isvc: dict[str, Any] | None = None,
    routed: bool = False,
) -> None:
    """The InferenceService the rollout state asks for (applied only when it differs), and the state,
    the wanted version, the observed split and KServe's conditions in status."""
    status = plan.status
    stable, canary, weight = state.stable, state.canary, state.weight
    target = None
    if state.shadow and canary:
        shadow = build_shadow_service(deployment, spec, (canary, uri_for(canary)),
                                      cluster_local=(spec.rollout.mode or DEFAULT_KSERVE_MODE) != "Knative")
        if needs_apply(shadow, shadow_isvc):
            plan.shadow_service = shadow
        if (url := shadow_url(shadow_isvc, canary)) is not None:
            s = spec.rollout.shadow
            target = ShadowTarget(url, shadow_service_name(deployment["metadata"]["name"]), canary, s.percent,
                                  s.timeout_ms)
        status["shadow"] = {"version": canary, "percent": spec.rollout.shadow.percent, "mirroring": target is not None}
    else:
        status.pop("shadow", None)
        if shadow_isvc is not None:
            plan.delete_shadow = shadow_isvc
    if stable is not None:
        desired = build_inference_service(
            deployment,
            spec,
            stable=(stable, uri_for(stable)),
            candidate=(canary, uri_for(canary)) if canary and not state.shadow else None,
            weight=weight,
            shadow=target,
            cluster_local=routed,
        )
        if needs_apply(desired, isvc):
            plan.inference_service = desired
    state_to_status(state, status)
    if wanted is not None and wanted != stable:
        status["candidateVersion"] = wanted
    else:
        status.pop("candidateVersion", None)
    status["traffic"] = observed_traffic(isvc, spec.rollout.mode, stable, canary, weight)
    _mirror_kserve_conditions(status, isvc)


@dataclass(frozen=True)
class ExperimentReading:
    """What the handler read for an A/B/N experiment when a read was due: figures, or the error."""

    figures: list[Figures] | None = None
    error: str | None = None


def experiment_served(isvc: dict[str, Any] | None, mode: str, versions: list[tuple[str, int]]) -> bool:
    """KServe reports the experiment's split served, on the latest spec."""
    if not _isvc_ready(isvc)[0] or isvc is None:
        return False
    if ((isvc["metadata"].get("annotations") or {}).get(ANNOTATION_EXPERIMENT) or "") != ",".join(
            f"{v}:{w}" for v, w in versions):
        return False
    st = isvc.get("status") or {}
    if mode == "Knative":
        return reported_weight(isvc, mode, versions[1][0]) == versions[1][1]
    served = {e.get("name"): int(e.get("trafficPercent") or 0) for e in st.get("canaryStatuses") or []
              if e.get("ready") is not False}
    return all(served.get(predictor_name(v)) == w for v, w in versions[1:])


def _experiment(
    plan: DeploymentPlan,
    deployment: dict[str, Any],
    spec: ModelDeploymentSpec,
    isvc: dict[str, Any] | None,
    uri_for: Callable[[str], str],
    now: datetime,
    reading: ExperimentReading | None,
    put: Callable[..., bool],
    routed: bool = False,
) -> None:
    """Strategy abn: serve the versions at their weights (Knative: the first alone until it is the
    previous revision), step the experiment (experiment.py), promote a significant winner."""
    status, exp_spec = plan.status, spec.rollout.experiment
    assert exp_spec is not None
    mode = spec.rollout.mode or DEFAULT_KSERVE_MODE
    versions = [(v.version, v.weight) for v in exp_spec.versions]
    first = versions[0][0]
    for key in (*_CANARY_STATUS, "candidateVersion"):
        status.pop(key, None)
    current = status.get("experiment")
    same = (current or {}).get("key") == experiment.key_of(exp_spec)
    if same and current and current.get("phase") == experiment.PROMOTED:
        winner = status.get("stableVersion") or first
        desired = build_inference_service(deployment, spec, stable=(winner, uri_for(winner)), cluster_local=routed)
        _experiment_child(plan, isvc, desired)
        put(c.PROGRESSING, c.FALSE, "ExperimentPromoted", f"{winner} won the experiment and serves all traffic.")
        _experiment_ready(plan, put, isvc, f"Serving {winner}.")
        status["traffic"] = [{"version": winner, "percent": 100, "tag": "stable"}]
        return
    if mode == "Knative" and status.get("stableVersion") != first:
        # KServe's Knative canary splits the latest revision from the previous one: roll the first version out
        # alone (it becomes the previous revision), then the second takes its weight.
        desired = build_inference_service(deployment, spec, stable=(first, uri_for(first)))
        _experiment_child(plan, isvc, desired)
        if _isvc_ready(isvc)[0] and not plan.inference_service:
            status["stableVersion"] = first
        put(c.PROGRESSING, c.TRUE, "ExperimentStarting", f"Rolling out {first} before the split.")
        _experiment_ready(plan, put, isvc, f"Serving {first}.")
        return
    desired = build_experiment_service(deployment, spec, [(v, uri_for(v), w) for v, w in versions], routed)
    _experiment_child(plan, isvc, desired)
    served = plan.inference_service is None and experiment_served(isvc, mode, versions)
    out = experiment.step(current, exp_spec, duration=parse_duration(exp_spec.duration),
                          interval=parse_duration(spec.rollout.interval), now=now, served=served,
                          figures=reading.figures if reading else None, error=reading.error if reading else None)
    plan.events += out.events
    status["experiment"] = out.status
    status["stableVersion"] = out.promote or first
    status["rolloutPhase"] = "Experiment"
    status["traffic"] = [{"version": v, "percent": w, "tag": "experiment"} for v, w in versions]
    if out.promote:
        plan.finished.append("Promoted")
        plan.inference_service = build_inference_service(
            deployment, spec, stable=(out.promote, uri_for(out.promote)), cluster_local=routed
        )
        put(c.PROGRESSING, c.FALSE, "ExperimentPromoted", f"{out.promote} won the experiment and serves all traffic.")
    else:
        phase = out.status["phase"]
        verdict = (out.status.get("verdict") or {}).get("message", "no verdict yet")
        done = phase == experiment.CONCLUDED
        put(c.PROGRESSING, c.FALSE if done else c.TRUE, f"Experiment{phase}",
            f"A/B/N {', '.join(f'{v} {w}%' for v, w in versions)}: {verdict}")
    _experiment_ready(plan, put, isvc, "Serving " + ", ".join(f"{v} at {w}%" for v, w in versions) + ".")


_CANARY_STATUS = ("canaryVersion", "canaryWeight", "rolloutStep", "failedAnalyses", "inconclusiveAnalyses",
                  "analysisErrors", "pauseReason", "pauseMessage", "stepStartTime", "nextAnalysisTime",
                  "rolloutStage", "shadow")


def _experiment_child(plan: DeploymentPlan, isvc: dict[str, Any] | None, desired: dict[str, Any]) -> None:
    if needs_apply(desired, isvc):
        plan.inference_service = desired


def _experiment_ready(plan: DeploymentPlan, put: Callable[..., bool], isvc: dict[str, Any] | None, message: str) -> None:
    ready, reason, ready_message = _isvc_ready(isvc)
    if plan.inference_service is not None:
        put(c.READY, c.FALSE, "Updating", "Applying the InferenceService spec.")
    elif ready:
        put(c.READY, c.TRUE, reason, message)
    else:
        put(c.READY, c.FALSE, reason, ready_message)
    failure = _isvc_failure(isvc)
    if failure is not None:
        if put(c.DEGRADED, c.TRUE, "ModelLoadFailed", failure):
            plan.events.append(("Warning", "ModelLoadFailed", failure))
    else:
        put(c.DEGRADED, c.FALSE, "AsExpected", "No failure reported.")
    _mirror_kserve_conditions(plan.status, isvc)


def shadow_url(shadow_isvc: dict[str, Any] | None, version: str) -> str | None:
    """The shadow InferenceService's address once KServe reports it Ready serving `version`."""
    if shadow_isvc is None or not _isvc_ready(shadow_isvc)[0]:
        return None
    if (shadow_isvc["metadata"].get("annotations") or {}).get("conveyor.dev/stable-version") != version:
        return None
    st = shadow_isvc.get("status") or {}
    return (st.get("address") or {}).get("url") or st.get("url")


def mirroring(isvc: dict[str, Any] | None, shadow_isvc: dict[str, Any] | None, version: str) -> bool:
    """The stable predictor mirrors to a Ready shadow: KServe reports both Ready, on their latest specs."""
    if shadow_url(shadow_isvc, version) is None or isvc is None or not _isvc_ready(isvc)[0]:
        return False
    containers = (isvc["spec"].get("predictor") or {}).get("containers") or [{}]
    env = {e.get("name"): e.get("value") for e in containers[0].get("env") or []}
    return env.get("CONVEYOR_SHADOW_VERSION") == version


def pending_action(deployment: dict[str, Any]) -> tuple[str, str] | None:
    """(action, annotation value) when the rollout-action annotation holds a value not yet acted on."""
    value = ((deployment["metadata"].get("annotations") or {}).get(ANNOTATION_ROLLOUT_ACTION) or "").strip()
    if not value or value == (deployment.get("status") or {}).get("lastRolloutAction"):
        return None
    return value.split("@", 1)[0].strip().lower(), value


def reported_weight(isvc: dict[str, Any] | None, mode: str | None, canary: str | None) -> int | None:
    """The canary's share of traffic as KServe reports it for the current spec; None when not reported
    (KServe has not observed the latest spec, or says nothing about the canary)."""
    if isvc is None or canary is None:
        return None
    st = isvc.get("status") or {}
    if st.get("observedGeneration") is None or not spec_observed(isvc):
        return None
    if mode == "Knative":
        entries = ((st.get("components") or {}).get("predictor") or {}).get("traffic") or []
        latest = [e for e in entries if e.get("latestRevision")]
        return int(latest[0].get("percent") or 0) if latest else None
    if (c.get_condition(st.get("conditions"), "IngressReady") or {}).get("status") == c.FALSE:
        return None  # Standard mode splits traffic only through an ingress: nothing is split yet
    for e in st.get("canaryStatuses") or []:
        if e.get("name") == predictor_name(canary) and e.get("ready") is not False:
            return int(e.get("trafficPercent") or 0)
    return None


def _roll(
    plan: DeploymentPlan,
    deployment: dict[str, Any],
    spec: ModelDeploymentSpec,
    isvc: dict[str, Any] | None,
    wanted: str | None,
    analysis: Analysis | None,
    now: datetime,
    shadow_isvc: dict[str, Any] | None = None,
) -> RolloutState:
    """One step of the rollout state machine; its actions become events, outcomes and status records."""
    status = plan.status
    _stable_from_the_served(status, deployment, isvc)
    state = state_from_status(status)
    if state.shadow and state.canary:  # the shadow's "weight" is reported once the mirror is in place
        weight = 0 if mirroring(isvc, shadow_isvc, state.canary) else None
    else:
        weight = reported_weight(isvc, spec.rollout.mode, state.canary)
    pending = pending_action(deployment)
    action = None
    if pending is not None:
        status["lastRolloutAction"] = pending[1]  # acted on once, whatever it was
        if pending[0] in ACTIONS:
            action = pending[0]
        else:
            plan.events.append(("Warning", "UnknownRolloutAction",
                                f"{ANNOTATION_ROLLOUT_ACTION}: {pending[1]!r} is not one of {', '.join(ACTIONS)}"))
    seen = Seen(
        wanted=wanted,
        rejected=frozenset(r["version"] for r in status.get("rejectedVersions") or [] if r.get("version")),
        reported_weight=weight,
        paused=spec.rollout.paused,
        action=action,
    )
    new, actions = next_step(state, analysis, now, policy=policy_for(spec), seen=seen)
    ts = rfc3339(now)
    for a in actions:
        if isinstance(a, Emit):
            plan.events.append((a.type, a.reason, a.message))
        elif isinstance(a, Finished):
            plan.finished.append(a.outcome)
        elif isinstance(a, Rejected):
            entry = {"version": a.version, "check": a.check, "message": a.message, "time": ts}
            if a.value is not None and math.isfinite(a.value):
                entry["value"] = a.value
            kept = [r for r in status.get("rejectedVersions") or [] if r.get("version") != a.version]
            status["rejectedVersions"] = [*kept, entry][-KEEP_REJECTED:]
        elif isinstance(a, Unrejected):
            kept = [r for r in status.get("rejectedVersions") or [] if r.get("version") != a.version]
            if kept:
                status["rejectedVersions"] = kept
            else:
                status.pop("rejectedVersions", None)
        elif isinstance(a, Analysed):
            record = _analysis_record(a.analysis, state, ts)
            status["analyses"] = [*(status.get("analyses") or []), record][-KEEP_ANALYSES:]
    if action is not None and not actions and new == state:
        plan.events.append(("Normal", "RolloutActionIgnored", f"{action}: nothing to {action} in phase {state.phase}"))
    return new


def _stable_from_the_served(status: dict[str, Any], deployment: dict[str, Any], isvc: dict[str, Any] | None) -> None:
    """Status names no stable version but this deployment's InferenceService serves one: that one is the
    stable version, so a new version is rolled out against it instead of replacing it at once. Status can
    lack it though a version serves: a spec change that landed between the InferenceService's apply and
    the status write (whose resourceVersion guard then refused it), or a restore that does not keep status."""
    if status.get("stableVersion") or isvc is None:
        return
    meta = isvc.get("metadata") or {}
    owners = [o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")]
    served = (meta.get("annotations") or {}).get(ANNOTATION_STABLE_VERSION)
    if served and owners == [deployment["metadata"].get("uid")]:
        status["stableVersion"] = served


def _analysis_record(analysis: Analysis, state: RolloutState, ts: str) -> dict[str, Any]:
    checks = []
    for check in analysis.checks:
        entry: dict[str, Any] = {"name": check.name, "verdict": check.verdict, "threshold": check.threshold}
        for key, value in (("candidate", check.candidate), ("stable", check.stable)):
            if value is not None and math.isfinite(value):
                entry[key] = value
        if check.message:
            entry["message"] = check.message
        checks.append(entry)
    return {"time": ts, "version": state.canary, "step": state.step, "weight": state.weight,
            "verdict": analysis.verdict, "message": analysis.message, "checks": checks}


def _reject(plan: DeploymentPlan, put: Callable[..., bool], isvc: dict[str, Any] | None, message: str) -> DeploymentPlan:
    """An invalid spec: say so, and leave the InferenceService as it is (still reporting what it does)."""
    if put(c.ACCEPTED, c.FALSE, "InvalidSpec", message):
        plan.events.append(("Warning", "InvalidSpec", message))
    put(c.PROGRESSING, c.FALSE, "InvalidSpec", "Nothing is rolled out until the spec is fixed.")
    ready, reason, ready_message = _isvc_ready(isvc)
    put(c.READY, c.TRUE if ready else c.FALSE, reason, ready_message)
    _mirror_url(plan.status, isvc)
    return plan


def _set_conditions(
    plan: DeploymentPlan,
    put: Callable[..., bool],
    isvc: dict[str, Any] | None,
    resolution: Resolution | None,
    state: RolloutState,
    unrouted: bool = False,
) -> None:
    ready, ready_reason, ready_message = _isvc_ready(isvc)
    up_to_date = plan.inference_service is None
    stable, canary, weight = state.stable, state.canary, state.weight
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
        _set_progressing(put, isvc, state, up_to_date and ready, unrouted)
    _set_degraded(plan, put, isvc, resolution, state)


def _set_progressing(
    put: Callable[..., bool], isvc: dict[str, Any] | None, state: RolloutState, settled: bool, unrouted: bool = False
) -> None:
    stable, canary, weight = state.stable, state.canary, state.weight
    if state.phase == PAUSED:
        # As a paused Deployment (and an Argo Rollout) reports it: progress is neither made nor failed.
        put(c.PROGRESSING, c.UNKNOWN, "RolloutPaused", f"{canary} held at {weight}%: {state.pause_message}")
    elif state.phase == ROLLING_BACK:
        put(c.PROGRESSING, c.TRUE, "RollingBack", f"{canary} at 0%; {stable} takes all traffic back.")
    elif canary:
        message = f"{canary} at {weight}% beside {stable}."
        ingress = c.get_condition(((isvc or {}).get("status") or {}).get("conditions"), "IngressReady")
        if ingress is not None and ingress.get("status") == c.FALSE:
            message += (" KServe reports IngressReady=False: Standard mode splits traffic only through an ingress "
                        "(Gateway API with enableGatewayApi, or Istio); the step waits until it does.")
        if unrouted:
            message += f" {NO_ROUTE_MESSAGE} (set --standard-gateway on a cluster serving the Gateway API)."
        put(c.PROGRESSING, c.TRUE, "CanaryInProgress", message)
    elif not settled:
        put(c.PROGRESSING, c.TRUE, "Reconciling", f"Rolling out {stable}.")
    elif state.phase == ROLLED_BACK:
        put(c.PROGRESSING, c.FALSE, "RolledBack", f"{stable} serves all traffic after a rollback.")
    else:
        put(c.PROGRESSING, c.FALSE, "RolloutComplete", f"{stable} serves all traffic.")


def _set_degraded(
    plan: DeploymentPlan,
    put: Callable[..., bool],
    isvc: dict[str, Any] | None,
    resolution: Resolution | None,
    state: RolloutState,
) -> None:
    failure = _isvc_failure(isvc)
    if resolution is not None and resolution.degraded:
        if put(c.DEGRADED, c.TRUE, resolution.reason or "ModelUnavailable", resolution.message):
            plan.events.append(("Warning", resolution.reason or "ModelUnavailable", resolution.message))
    elif failure is not None:
        if put(c.DEGRADED, c.TRUE, "ModelLoadFailed", failure):
            plan.events.append(("Warning", "ModelLoadFailed", failure))
    elif state.phase in (ROLLING_BACK, ROLLED_BACK):
        last = (plan.status.get("rejectedVersions") or [{}])[-1]
        put(c.DEGRADED, c.TRUE, "RolledBack",
            f"{last.get('version', 'the candidate')} was rolled back ({last.get('check', '')}: {last.get('message', '')}); "
            f"{state.stable} serves. A newer version, or kubectl conveyor retry, starts a new rollout.")
    else:
        put(c.DEGRADED, c.FALSE, "AsExpected", "No failure reported.")


def _served_versions(status: dict[str, Any]) -> list[tuple[str, int]]:
    """(version, weight) the status says are served, the stable (or first) version first."""
    stable = status.get("stableVersion")
    if status.get("rolloutPhase") == "Experiment" and (status.get("experiment") or {}).get("phase") != experiment.PROMOTED:
        return [(t["version"], int(t["percent"])) for t in status.get("traffic") or []]
    if not stable:
        return []
    canary = status.get("canaryVersion")
    if canary and not status.get("shadow"):
        return [(stable, 100 - int(status.get("canaryWeight") or 0)), (canary, int(status.get("canaryWeight") or 0))]
    return [(stable, 100)]


def _our_route(deployment: dict[str, Any], routing: Routing) -> dict[str, Any] | None:
    name = deployment["metadata"]["name"]
    return next((r for r in routing.routes or []
                 if r["metadata"]["name"] == route_name(name) and owned_by(r, "ModelDeployment", name)), None)


def _traffic_from_route(status: dict[str, Any], deployment: dict[str, Any], routing: Routing) -> None:
    """status.traffic as the operator's route carries it (what the gateway serves; nothing before the route
    exists), each version tagged as the rollout or experiment names it."""
    tags = {t["version"]: t.get("tag", "") for t in status.get("traffic") or []}
    status["traffic"] = carried_traffic(_our_route(deployment, routing), deployment["metadata"]["name"], tags)


def _route(
    plan: DeploymentPlan,
    deployment: dict[str, Any],
    isvc: dict[str, Any] | None,
    routing: Routing | None,
    versions: list[tuple[str, int]],
    shadow_isvc: dict[str, Any] | None = None,
) -> None:
    """Standard mode's weighted HTTPRoute (route.py): applied once KServe reports the host it would have
    served; KServe's own routes (of the InferenceService, or of the shadow's) deleted once it has been told
    not to expose it; ours deleted when the feature is off."""
    if routing is None or routing.routes is None:
        return
    name = deployment["metadata"]["name"]
    ours = _our_route(deployment, routing)
    if routing.gateway is None:
        if ours is not None:
            plan.delete_routes.append(ours)
        return
    host = hostname(isvc)
    if host is not None and versions:
        desired = build_route(deployment, routing.gateway, host, effective_backends(versions, isvc))
        if needs_apply(desired, ours):
            plan.route = desired
    if cluster_local(isvc):
        plan.delete_routes += [r for r in routing.routes if owned_by(r, "InferenceService", name)]
    if shadow_isvc is not None and cluster_local(shadow_isvc):
        shadow = shadow_isvc["metadata"]["name"]
        plan.delete_routes += [r for r in routing.routes if owned_by(r, "InferenceService", shadow)]


def _mirror_kserve_conditions(status: dict[str, Any], isvc: dict[str, Any] | None) -> None:
    """KServe's own conditions (PredictorReady, IngressReady, CanaryPredictorReady, ...), without their
    times, so a person sees in one place why traffic is or is not split."""
    conds = ((isvc or {}).get("status") or {}).get("conditions") or []
    mirrored = [{k: x[k] for k in ("type", "status", "reason", "message") if x.get(k)} for x in conds if x.get("type")]
    if mirrored:
        status["inferenceServiceConditions"] = mirrored
    else:
        status.pop("inferenceServiceConditions", None)


def _mirror_url(status: dict[str, Any], isvc: dict[str, Any] | None) -> None:
    url = ((isvc or {}).get("status") or {}).get("url")
    if url:
        status["url"] = url
    else:
        status.pop("url", None)
