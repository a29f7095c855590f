"""Reconcile one MLPipeline: observe (every read, into one frozen snapshot), plan (pure, once), act.

observe: the pipeline and its RayJobs from the cache; a live GET for an active run's RayJob the cache
         lacks (not listed yet, or deleted); the outcome record of each run whose RayJob ended and the
         registry's verdict on runs whose RayJob succeeded (blocking reads, in a thread); the
         ModelDeployment that spec.deploy names.
         For a run pending past blockers.STALLED_AFTER: its RayCluster, pods and the events on them (and
         on its RayJob), read once, to say why it does not start.
plan:    `plan.plan_pipeline` -> the status, the run to start, the RayJobs to delete, the events.
act:     the run's RayJob is created (a POST: the apiserver refuses a second one of the name with a 409,
         when one made just before a restart is not in the snapshot yet; the reconcile is then requeued
         to plan again from a snapshot that holds it); its ConfigMap applied, deletions made, status
         written once, events posted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.operator.controller import conditions as c
from conveyor.operator.controller import metrics
from conveyor.operator.controller.cache import Key
from conveyor.operator.controller.client import Conflict, NotFound, object_path, resource_path
from conveyor.operator.controller.runs import (
    ACTIVE,
    PENDING,
    rayjob_state,
    rayjobs_by_run,
    runs_awaiting_report,
)
from conveyor.operator.controller.status import write_status
from conveyor.operator.controller.times import parse_time
from conveyor.operator.controller.validation import InvalidSpecError, parse_spec
from conveyor.operator.controller.workqueue import Requeue
from conveyor.operator.mlpipeline.blockers import STALLED_AFTER, StartBlocker, queue_blocker, start_blocker
from conveyor.operator.mlpipeline.build import (
    LABEL_KUEUE_QUEUE,
    LABEL_PIPELINE,
    build_rayjob,
    build_run_configmap,
    rayjob_name,
)
from conveyor.operator.mlpipeline.gate import GateOutcome, judge_run
from conveyor.operator.mlpipeline.plan import (
    DeployTarget,
    DriftSignal,
    PipelinePlan,
    plan_pipeline,
    runs_awaiting_gate,
)
from conveyor.operator.mlpipeline.validate import validate_pipeline
from conveyor.operator.modeldeployment.rollout import parse_duration
from conveyor.runtime.package.registry import PackageError, package_uri
from conveyor.runtime.spec import DeployedModel, MLPipelineSpec

if TYPE_CHECKING:
    from conveyor.operator.controller.manager import Operator

log = logging.getLogger("conveyor.operator.mlpipeline")


@dataclass(frozen=True)
class PipelineSnapshot:
    """Everything the planner needs, read once."""

    key: Key
    pipeline: dict[str, Any]
    spec: MLPipelineSpec | None
    invalid: str | None
    rayjobs: dict[int, dict[str, Any]]
    missing_rayjobs: frozenset[int]
    gate: dict[int, GateOutcome]
    deploy_target: DeployTarget | None
    now: datetime
    reports: dict[int, dict[str, Any]]
    drift: DriftSignal | None = None
    blockers: dict[int, StartBlocker] = field(default_factory=dict)


async def reconcile_pipeline(op: Operator, key: Key) -> float | None:
    snapshot = await observe(op, key)
    if snapshot is None:
        op.pipeline_queue.forget(key)
        op.note_run(key, None)
        return None
    s = snapshot
    plan = plan_pipeline(
        s.pipeline,
        s.spec,
        s.invalid,
        s.rayjobs,
        s.gate,
        s.now,
        missing_rayjobs=s.missing_rayjobs,
        deploy_target=s.deploy_target,
        reports=s.reports,
        drift=s.drift,
        blockers=s.blockers,
    )
    await act(op, snapshot, plan)
    return plan.requeue_after


# ---------------------------------------------------------------- observe


async def observe(op: Operator, key: Key) -> PipelineSnapshot | None:
    obj = op.pipelines.get(key)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return None
    namespace, name = key
    status = obj.get("status") or {}
    spec, invalid = parse_spec(MLPipelineSpec, obj.get("spec") or {})
    if spec is not None and invalid is None:
        try:
            validate_pipeline(obj, spec, int(status.get("lastRun") or 0) + 1)
        except InvalidSpecError as e:
            invalid = str(e)
    if spec is not None and invalid is None:
        invalid = await op.registry_problem(spec.registry.uri, spec.registry.model_name, "spec.registry.uri")
    rayjobs = rayjobs_by_run(op.rayjobs.in_namespace(namespace, label=LABEL_PIPELINE, value=name))
    missing = await _confirm_missing(op, namespace, name, status, rayjobs)
    deploy_target = _deploy_target(op, namespace, name, spec) if spec is not None else None
    reports: dict[int, dict[str, Any]] = {}
    gate: dict[int, GateOutcome] = {}
    if spec is not None and invalid is None:  # an invalid spec stops all work, registry reads included
        registry = op.registry(spec.registry.uri, spec.registry.model_name)
        for n in runs_awaiting_report(status, rayjobs):
            try:
                report = await asyncio.to_thread(registry.read_run_record, namespace, name, n)
            except PackageError as e:  # a corrupt record says nothing; the RayJob and the package still do
                log.warning("%s/%s: run %d's outcome record is unreadable: %s", namespace, name, n, e)
                report = None
            if report is not None:
                reports[n] = report
        for n in runs_awaiting_gate(status, rayjobs, reports):
            gate[n] = await asyncio.to_thread(_judge, op, spec, namespace, name, n, deploy_target)
    drift = _drift_signal(op, namespace, name)
    now = op.clock()
    blockers = await _start_blockers(op, namespace, status, rayjobs, now)
    return PipelineSnapshot(
        key,
        obj,
        spec,
        invalid,
        rayjobs,
        frozenset(missing),
        gate,
        deploy_target,
        now,
        reports,
        drift,
        blockers,
    )


async def _start_blockers(
    op: Operator, namespace: str, status: dict[str, Any], rayjobs: dict[int, dict[str, Any]], now: datetime
) -> dict[int, StartBlocker]:
    """Why runs pending past STALLED_AFTER do not start. Only those runs cost reads, and only while KubeRay
    is still making their cluster. A RayJob Kueue holds suspended is queued: its Workload says why, read
    at once (one list; the wait is Kueue's, not a stall)."""
    found: dict[int, StartBlocker] = {}
    for run in status.get("runs") or []:
        rj, started = rayjobs.get(run["run"]), parse_time(run.get("startTime"))
        if rj is None or run.get("outcome") != PENDING or started is None:
            continue
        queue = (rj["metadata"].get("labels") or {}).get(LABEL_KUEUE_QUEUE)
        if queue and (rj.get("spec") or {}).get("suspend"):
            queued = queue_blocker(queue, await _workloads(op, namespace, rj))
            if queued is not None:
                found[run["run"]] = queued
            continue
        if (now - started).total_seconds() < STALLED_AFTER or rayjob_state(rj).reason not in (
            "Created",
            "New",
            "Initializing",
        ):
            continue
        blocker = await _read_blocker(op, namespace, rj)
        if blocker is not None:
            found[run["run"]] = blocker
    return found


async def _workloads(op: Operator, namespace: str, rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    """The Kueue Workloads made for this RayJob (labelled with its uid), v1beta2 or an older Kueue's v1beta1."""
    selector = f"kueue.x-k8s.io/job-uid={rayjob['metadata'].get('uid', '')}"
    for version in ("v1beta2", "v1beta1"):
        try:
            return await op.client.list(
                resource_path(f"kueue.x-k8s.io/{version}", "workloads", namespace),
                label_selector=selector,
                resource="Workload",
            )
        except NotFound:
            continue
    return []


async def _read_blocker(op: Operator, namespace: str, rayjob: dict[str, Any]) -> StartBlocker | None:
    """The RayCluster's conditions and the Warning events on the RayJob (and its submitter Job, of the
    same name), the RayCluster and its pods (named after it): what KubeRay, the job controller, the
    scheduler and the kubelets said."""
    job, cluster = rayjob["metadata"]["name"], (rayjob.get("status") or {}).get("rayClusterName")
    raycluster = None
    if cluster:
        raycluster = await op.client.get(
            resource_path("ray.io/v1", "rayclusters", namespace, cluster), resource="RayCluster"
        )

    def about_the_run(event: dict[str, Any]) -> bool:
        name = (event.get("involvedObject") or {}).get("name") or ""
        return name == job or bool(cluster) and (name == cluster or name.startswith(f"{cluster}-"))

    mine = sorted(
        (e for e in await op.warning_events(namespace) if about_the_run(e)),
        key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "",
        reverse=True,  # the newest first
    )
    return start_blocker(raycluster, mine)


def _drift_signal(op: Operator, namespace: str, pipeline: str) -> DriftSignal | None:
    """The first ModelDeployment retraining through this pipeline that reports Drifted=True."""
    for md in op.deployments.in_namespace(namespace):
        monitoring = (md.get("spec") or {}).get("monitoring") or {}
        if monitoring.get("retrainPipeline") != pipeline:
            continue
        drifted = c.get_condition((md.get("status") or {}).get("conditions"), c.DRIFTED) or {}
        if drifted.get("status") == c.TRUE and drifted.get("lastTransitionTime"):
            cooldown = parse_duration(monitoring.get("retrainCooldown") or "1h").total_seconds()
            return DriftSignal(
                md["metadata"]["name"], drifted["lastTransitionTime"], drifted.get("message", ""), cooldown
            )
    return None


async def _confirm_missing(
    op: Operator, namespace: str, name: str, status: dict[str, Any], rayjobs: dict[int, dict[str, Any]]
) -> set[int]:
    """Active runs whose RayJob the cache lacks: read it live; absent there too means it was deleted."""
    missing: set[int] = set()
    for run in status.get("runs") or []:
        n = run["run"]
        if run.get("outcome") not in ACTIVE or n in rayjobs:
            continue
        live = await op.client.get(
            resource_path("ray.io/v1", "rayjobs", namespace, rayjob_name(name, n)), resource="RayJob"
        )
        if live is None:
            missing.add(n)
            continue
        live.setdefault("apiVersion", "ray.io/v1")
        live.setdefault("kind", "RayJob")
        op.rayjobs.remember(live)
        rayjobs[n] = live
    return missing


def _deploy_target(op: Operator, namespace: str, pipeline: str, spec: MLPipelineSpec) -> DeployTarget | None:
    if spec.deploy is None:
        return None
    name = spec.deploy.model_deployment
    md = op.deployments.get((namespace, name))
    if md is None:
        return DeployTarget(name, exists=False, follows=False)
    model = (md.get("spec") or {}).get("model") or {}
    version = model.get("version", "latest")
    follows = version == "latest" and model.get("pipeline") in (None, pipeline)
    pinned = version if version != "latest" else f"latest of MLPipeline {model.get('pipeline')}"
    serving = None
    stable = (md.get("status") or {}).get("stableVersion")
    if stable and model.get("registryUri") and model.get("name"):
        serving = DeployedModel(
            version=stable, package_uri=package_uri(model["registryUri"], model["name"], stable)
        )
    return DeployTarget(
        name, exists=True, follows=follows, pinned_version=None if follows else pinned, serving=serving
    )


def _judge(
    op: Operator, spec: MLPipelineSpec, namespace: str, pipeline: str, run: int, target: DeployTarget | None
) -> GateOutcome:
    """The gate's verdict on a run (blocking registry reads: called in a thread)."""
    deployed = None
    if spec.evaluation.must_beat_deployed and target is not None and target.exists:
        md = op.deployments.get((namespace, target.name)) or {}
        version = (md.get("status") or {}).get("stableVersion")
        model = (md.get("spec") or {}).get("model") or {}
        if version:
            registry = (
                op.registry(model["registryUri"], model["name"])
                if model.get("registryUri") and model.get("name")
                else None
            )
            deployed = (version, registry)
    registry = op.registry(spec.registry.uri, spec.registry.model_name)
    return judge_run(
        registry, spec.evaluation, pipeline=pipeline, namespace=namespace, run=run, deployed=deployed
    )


# ---------------------------------------------------------------- act


async def act(op: Operator, s: PipelineSnapshot, plan: PipelinePlan) -> None:
    namespace, name = s.key
    if plan.start_run is not None:
        assert s.spec is not None
        created = await _create_rayjob(
            op, build_rayjob(s.pipeline, s.spec, plan.start_run, plan.start_trigger or "")
        )
        op.rayjobs.remember(created)
        serving = s.deploy_target.serving if s.deploy_target is not None else None
        await op.client.apply(build_run_configmap(s.pipeline, s.spec, plan.start_run, created, serving))
        log.info("%s/%s: run %d started (%s)", namespace, name, plan.start_run, plan.start_trigger)
    await _config_maps_of_adopted_runs(op, s, plan)
    # Before the status says GateFailed: `latest` must skip them.
    if plan.reject_versions and s.spec is not None:
        registry = op.registry(s.spec.registry.uri, s.spec.registry.model_name)
        for version, why in plan.reject_versions.items():
            await asyncio.to_thread(registry.reject, version, why[:1000])
    for rj_name in plan.delete_rayjobs:
        await op.client.delete(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayJob",
                "metadata": {"name": rj_name, "namespace": namespace},
            }
        )
    old = s.pipeline.get("status") or {}
    await write_status(op.client, op.pipelines, s.pipeline, plan.status)
    for run in plan.status.get("runs") or []:  # counted once: only after the status recorded it
        before = next((r for r in old.get("runs") or [] if r.get("run") == run["run"]), None)
        if run.get("outcome") not in ACTIVE and (before is None or before.get("outcome") in ACTIVE):
            metrics.RUNS_FINISHED.labels(run.get("outcome", "")).inc()
    op.emit(s.pipeline, plan.events)
    if plan.status.get("latestVersion") != old.get("latestVersion"):
        for md_key in op.deployments_following(namespace, s.pipeline):
            op.deployment_queue.add(md_key)
    op.note_run(s.key, plan.status)


async def _config_maps_of_adopted_runs(op: Operator, s: PipelineSnapshot, plan: PipelinePlan) -> None:
    """A run adopted from a RayJob the status did not record (made just before a crash, or before a
    status write that lost a conflict) may lack its ConfigMap, which is applied after the RayJob: its pods
    would wait for it for ever. Created if missing, never replaced (the run may be reading it)."""
    if s.spec is None:
        return
    known = {r["run"] for r in (s.pipeline.get("status") or {}).get("runs") or []}
    serving = s.deploy_target.serving if s.deploy_target is not None else None
    for run in plan.status.get("runs") or []:
        n = run["run"]
        if n in known or n == plan.start_run or n not in s.rayjobs:
            continue
        with contextlib.suppress(Conflict):  # it exists: the usual case
            await op.client.create(build_run_configmap(s.pipeline, s.spec, n, s.rayjobs[n], serving))


async def _create_rayjob(op: Operator, rayjob: dict[str, Any]) -> dict[str, Any]:
    """Create the run's RayJob, unless one of its name exists that the snapshot did not know (the cache
    may lag behind a RayJob made just before a restart, whose run the status never recorded: a run's
    RayJob is created before the status that records it). The apiserver's 409 says so, atomically; the
    RayJob is read into the cache and the reconcile requeued to plan again from a snapshot that holds
    it (adopting it keeps one RayJob per run). Only the run planned can have such an orphan: the planner
    numbers a new run lastRun + 1, and the status records each run before the next one's RayJob exists."""
    try:
        return await op.client.create(rayjob)
    except Conflict:
        live = await op.client.get(object_path(rayjob), resource="RayJob")
        if live is not None:
            live.setdefault("apiVersion", "ray.io/v1")
            live.setdefault("kind", "RayJob")
            op.rayjobs.remember(live)
        raise Requeue(0.0) from None
