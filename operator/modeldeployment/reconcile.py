"""Reconcile one ModelDeployment: observe (every read, into one frozen snapshot), plan (pure, once), act.

observe: the deployment and its InferenceService from the cache; the KServe mode settled (the spec's,
         the live InferenceService's, or the operator's default); the version the spec asks for,
         resolved from a pinned version (checked in the registry), a pipeline's status, or the
         registry's newest version (blocking reads, in a thread).
         When status says a canary's analysis is due (rollout.py), the analysis from Prometheus
         (analysis.py); every monitoring.interval, the stable version's drift reading (drift.py):
         taken here, so that planning stays pure.
         In Standard mode, the HTTPRoutes labelled with the deployment (route.py: the operator's weighted
         route, and any KServe wrote) from their watch-fed cache; none where the API serves no Gateway
         API (discovered at startup, handlers.py).
plan:    `plan.plan_deployment` -> the status, the InferenceService (and route) to apply (None when
         unchanged), events.
act:     apply the InferenceService and the route, delete routes no longer wanted, write status once,
         post events, count finished rollouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.operator.controller import metrics
from conveyor.operator.controller.cache import Key
from conveyor.operator.controller.prometheus import PrometheusError
from conveyor.operator.controller.status import write_status
from conveyor.operator.controller.times import parse_time
from conveyor.operator.controller.validation import parse_spec
from conveyor.operator.modeldeployment import compat, drift, experiment
from conveyor.operator.modeldeployment.analysis import Target, analyse
from conveyor.operator.modeldeployment.build import LABEL_DEPLOYMENT, shadow_service_name
from conveyor.operator.modeldeployment.plan import (
    DeploymentPlan,
    ExperimentReading,
    Resolution,
    Routing,
    pending_action,
    plan_deployment,
)
from conveyor.operator.modeldeployment.rollout import Analysis, state_from_status
from conveyor.operator.modeldeployment.route import parse_gateway
from conveyor.operator.modeldeployment.validate import kserve_mode_conflict, with_kserve_mode
from conveyor.runtime.spec import ModelDeploymentSpec

if TYPE_CHECKING:
    from conveyor.operator.controller.manager import Operator


@dataclass(frozen=True)
class DeploymentSnapshot:
    key: Key
    deployment: dict[str, Any]
    spec: ModelDeploymentSpec | None
    invalid: str | None
    resolution: Resolution | None
    isvc: dict[str, Any] | None
    uri_for: Callable[[str], str]
    now: datetime
    analysis: Analysis | None = None
    drift_reading: drift.DriftReading | None = None
    compatibility: compat.Compatibility | None = None
    shadow_isvc: dict[str, Any] | None = None  # strategy shadow: the candidate's own InferenceService
    experiment_reading: ExperimentReading | None = None  # strategy abn: the figures, when a read was due
    routing: Routing | None = None  # Standard mode: the gateway route's setting and the routes found


async def reconcile_deployment(op: Operator, key: Key) -> float | None:
    s = await observe(op, key)
    if s is None:
        op.deployment_queue.forget(key)
        op.note_rollout(key, None)
        with contextlib.suppress(KeyError):
            metrics.CANARY_WEIGHT.remove(*key)
        return None
    plan = _plan(s)
    s, plan = await act(op, s, plan)
    return _requeue_after(op, s, plan)


def _plan(s: DeploymentSnapshot) -> DeploymentPlan:
    return plan_deployment(
        s.deployment,
        s.spec,
        s.invalid,
        s.resolution,
        s.isvc,
        s.uri_for,
        s.now,
        s.analysis,
        s.drift_reading,
        s.compatibility,
        s.shadow_isvc,
        s.experiment_reading,
        s.routing,
    )


def _requeue_after(op: Operator, s: DeploymentSnapshot, plan: DeploymentPlan) -> float | None:
    """Nothing announces that an analysis is due or that the registry has a new version: come back then."""
    waits = []
    for due in (
        plan.status.get("nextAnalysisTime"),
        (plan.status.get("experiment") or {}).get("nextReadTime"),
    ):
        if (t := parse_time(due)) is not None:
            waits.append(max(0.0, (t - s.now).total_seconds()))
    if s.resolution is not None and s.resolution.source == "registry":
        waits.append(op.config.registry_poll_seconds)
    if (
        s.spec is not None
        and s.invalid is None
        and (drift_wait := drift.seconds_until_due(op, plan.status, s.spec, s.now)) is not None
    ):
        waits.append(drift_wait)
    return min(waits) if waits else None


# ---------------------------------------------------------------- observe


async def observe(op: Operator, key: Key) -> DeploymentSnapshot | None:
    obj = op.deployments.get(key)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return None
    spec, invalid = parse_spec(ModelDeploymentSpec, obj.get("spec") or {})
    isvc = op.isvcs.get(key)
    if spec is not None:
        invalid = invalid or kserve_mode_conflict(spec, isvc)
        spec = with_kserve_mode(spec, isvc, op.config.default_kserve_mode)
    resolution = compatibility = None
    uri_for: Callable[[str], str] = str
    if spec is not None and invalid is None:
        invalid = await op.registry_problem(
            spec.model.registry_uri, spec.model.name, "spec.model.registryUri"
        )
    if spec is not None and invalid is None:
        registry = op.registry(spec.model.registry_uri, spec.model.name)
        uri_for = registry.package_uri
        resolution = await _resolve(op, key, spec, registry)
        compatibility = await compat.check(
            registry, (obj.get("status") or {}).get("stableVersion"), resolution.version
        )
    now = op.clock()
    analysis = drift_reading = None
    if spec is not None and invalid is None:
        analysis = await _analysis_if_due(op, key, obj, spec, now)
        drift_reading = await drift.measure_if_due(op, key, obj, spec, now)
    shadow_isvc = op.isvcs.get((key[0], shadow_service_name(key[1])))
    reading = None
    if spec is not None and invalid is None and spec.rollout.strategy == "abn" and spec.rollout.experiment:
        reading = await _experiment_reading(op, key, obj, spec, now)
    routing = None
    if spec is not None and invalid is None and spec.rollout.mode == "Standard":
        routing = Routing(parse_gateway(op.config.standard_gateway), _routes(op, key))
    return DeploymentSnapshot(
        key,
        obj,
        spec,
        invalid,
        resolution,
        isvc,
        uri_for,
        now,
        analysis,
        drift_reading,
        compatibility,
        shadow_isvc,
        reading,
        routing,
    )


def _routes(op: Operator, key: Key) -> list[dict[str, Any]] | None:
    """The HTTPRoutes labelled with the deployment (KServe copies the InferenceService's labels onto its
    own), as the watch last delivered them; None when the API serves no HTTPRoute resource (the Gateway API
    is not installed)."""
    if not op.gateway_api:
        return None
    namespace, name = key
    return op.routes.in_namespace(namespace, label=LABEL_DEPLOYMENT, value=name)


async def _experiment_reading(
    op: Operator, key: Key, obj: dict[str, Any], spec: ModelDeploymentSpec, now: datetime
) -> ExperimentReading | None:
    """Every version's figures over the experiment so far, when status says a read is due."""
    exp = (obj.get("status") or {}).get("experiment")
    experiment_spec = spec.rollout.experiment
    if experiment_spec is None or not experiment.read_due(exp, now):
        return None
    if op.prometheus is None:
        return ExperimentReading(
            error="no Prometheus configured (--prometheus-url / CONVEYOR_PROMETHEUS_URL)"
        )
    window = experiment.elapsed_window(exp, now)
    figures = []
    try:
        for v in experiment_spec.versions:
            qs = experiment.queries(key[0], key[1], v.version, window, spec.rollout.analysis.checks)
            values = await asyncio.gather(*(_scalar(op, q) for q in qs.values()))
            figures.append(experiment.figures_from(v.version, v.weight, dict(zip(qs, values, strict=True))))
    except PrometheusError as e:
        return ExperimentReading(error=f"Prometheus: {e}")
    return ExperimentReading(figures=figures)


async def _scalar(op: Operator, promql: str) -> float | None:
    samples = await op.prometheus.query(promql)
    if len(samples) != 1 or math.isnan(samples[0].value):
        return None
    return samples[0].value


async def _analysis_if_due(
    op: Operator, key: Key, obj: dict[str, Any], spec: ModelDeploymentSpec, now: datetime
) -> Analysis | None:
    """The canary's analysis, when status says one is due and no person's action or pause overrides it."""
    state = state_from_status(obj.get("status") or {})
    if not state.analysis_due(now) or state.canary is None or spec.rollout.paused or pending_action(obj):
        return None
    namespace, name = key
    return await analyse(
        op.prometheus,
        spec.rollout.analysis,
        Target(namespace, name, state.canary, state.stable, shadow=state.shadow),
    )


async def _resolve(op: Operator, key: Key, spec: ModelDeploymentSpec, registry: Any) -> Resolution:
    """The version the spec asks for (the module docstring of plan.py tells the hand-off rules)."""
    namespace, name = key
    model = spec.model
    if model.version != "latest":
        known = (model.registry_uri, model.name, model.version) in op.known_versions  # no I/O, no thread
        if known or await asyncio.to_thread(
            _version_exists, op, registry, model.registry_uri, model.name, model.version
        ):
            return Resolution(model.version, "pinned")
        return Resolution(
            None,
            "pinned",
            "VersionNotFound",
            f"spec.model.version {model.version} is not a committed version of {model.name} in {model.registry_uri}",
            degraded=True,
        )
    sources = (
        [model.pipeline]
        if model.pipeline
        else [
            p["metadata"]["name"]
            for p in op.pipelines.in_namespace(namespace)
            if ((p.get("spec") or {}).get("deploy") or {}).get("modelDeployment") == name
        ]
    )
    if len(sources) > 1:
        return Resolution(
            None,
            "pipelines",
            "AmbiguousPipeline",
            f"MLPipelines {', '.join(sorted(sources))} all deploy to {name}; set spec.model.pipeline to choose one",
            degraded=True,
        )
    if sources:
        return _from_pipeline(op.pipelines.get((namespace, sources[0])), sources[0])
    latest = await asyncio.to_thread(registry.latest)
    if latest is None:
        return Resolution(
            None, "registry", "NoModelVersion", f"{model.registry_uri} holds no version of {model.name} yet"
        )
    return Resolution(latest, "registry")


def _from_pipeline(pipeline: dict[str, Any] | None, name: str) -> Resolution:
    if pipeline is None:
        return Resolution(None, f"pipeline {name}", "PipelineNotFound", f"MLPipeline {name} does not exist")
    version = (pipeline.get("status") or {}).get("latestVersion")
    if not version:
        return Resolution(
            None,
            f"pipeline {name}",
            "AwaitingModel",
            f"Waiting for MLPipeline {name} to pass a version through its evaluation gate.",
        )
    return Resolution(version, f"pipeline {name}")


def _version_exists(op: Operator, registry: Any, uri: str, model: str, version: str) -> bool:
    # Committed versions never change, so a positive answer is cached for good.
    if (uri, model, version) in op.known_versions:
        return True
    # Committed (manifest valid, every file there at its size); the predictor verifies checksums at load.
    if version in registry.versions(verify=False):
        op.known_versions.add((uri, model, version))
        return True
    return False


# ---------------------------------------------------------------- act


async def act(
    op: Operator, s: DeploymentSnapshot, plan: DeploymentPlan
) -> tuple[DeploymentSnapshot, DeploymentPlan]:
    """Apply, then write the status once. After an apply, the status written is the one the next
    reconcile would write on seeing the applied InferenceService come back through the watch (planned
    here from the apply's response and the status this plan made), when that plan has nothing more to
    apply: one status write per change instead of two (`Updating`, then what KServe reports), a third
    fewer writes in a burst of new ModelDeployments. Returns the snapshot and plan whose status was
    written."""
    applied: dict[str, Any] = {}
    if plan.shadow_service is not None:
        applied["shadow_isvc"] = await op.client.apply(plan.shadow_service)
        op.isvcs.remember(applied["shadow_isvc"])
    if plan.inference_service is not None:
        applied["isvc"] = await op.client.apply(plan.inference_service)
        op.isvcs.remember(applied["isvc"])
    if plan.delete_shadow is not None:
        await op.client.delete(plan.delete_shadow)
        applied.setdefault("shadow_isvc", None)
    if (plan.route is not None or plan.delete_routes) and s.routing is not None and s.routing.routes is not None:
        gone = {r["metadata"]["name"] for r in plan.delete_routes}
        for route in plan.delete_routes:
            await op.client.delete(route)
            op.routes.observe({"type": "DELETED", "object": route})
        routes = [r for r in s.routing.routes if r["metadata"]["name"] not in gone]
        if plan.route is not None:
            live = await op.client.apply(plan.route)
            op.routes.remember(live)
            routes = [r for r in routes if r["metadata"]["name"] != live["metadata"]["name"]] + [live]
        applied["routing"] = dataclasses.replace(s.routing, routes=routes)
    if applied:
        ahead = dataclasses.replace(s, deployment={**s.deployment, "status": plan.status}, **applied)
        then = _plan(ahead)
        if (
            then.inference_service is None
            and then.shadow_service is None
            and then.delete_shadow is None
            and then.route is None
            and not then.delete_routes
        ):
            events, finished = plan.events + then.events, plan.finished + then.finished
            plan = dataclasses.replace(then, events=events, finished=finished)
            s = dataclasses.replace(
                ahead, deployment=s.deployment
            )  # the status write compares with what was read
    await write_status(op.client, op.deployments, s.deployment, plan.status)
    op.emit(s.deployment, plan.events)
    if s.spec is not None and (
        pipeline := drift.pipeline_to_wake(s.deployment.get("status") or {}, plan.status, s.spec)
    ):
        op.pipeline_queue.add((s.key[0], pipeline))
    for outcome in plan.finished:
        metrics.ROLLOUTS_FINISHED.labels(*s.key, outcome).inc()
    metrics.CANARY_WEIGHT.labels(*s.key).set(plan.status.get("canaryWeight") or 0)
    op.note_rollout(s.key, plan.status)
    return s, plan
