"""Reconcile one BatchPrediction: observe (every read, into one frozen snapshot), plan (pure, once), act.

observe: the object and its RayJobs from the cache; a live GET for an active run's RayJob the cache
         lacks; the outcome record of each run whose RayJob ended (a blocking read of the output
         storage, in a thread); the model, resolved from the spec, the MLPipeline or the ModelDeployment
         it names (caches).
plan:    `plan.plan_batch` -> the status, the run to start, the RayJobs to delete, the events.
act:     before creating a RayJob, one live LIST asks the apiserver for a RayJob of this object the
         snapshot did not know (made just before a restart): if there is one the reconcile plans again.
         Then the RayJob and its ConfigMap are applied, deletions made, status written once, events posted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.operator.batchprediction.build import (
    LABEL_BATCH,
    ResolvedModel,
    build_rayjob,
    build_run_configmap,
)
from conveyor.operator.batchprediction.plan import BatchPlan, ModelResolution, plan_batch
from conveyor.operator.batchprediction.validate import validate_batch
from conveyor.operator.controller.cache import Key
from conveyor.operator.controller.client import resource_path
from conveyor.operator.controller.runs import ACTIVE, rayjobs_by_run, runs_awaiting_report
from conveyor.operator.controller.status import write_status
from conveyor.operator.controller.validation import InvalidSpecError, parse_spec
from conveyor.operator.controller.workqueue import Requeue
from conveyor.runtime.package.registry import PackageError
from conveyor.runtime.spec import BatchPredictionSpec

if TYPE_CHECKING:
    from conveyor.operator.controller.manager import Operator

log = logging.getLogger("conveyor.operator.batchprediction")


@dataclass(frozen=True)
class BatchSnapshot:
    key: Key
    bp: dict[str, Any]
    spec: BatchPredictionSpec | None
    invalid: str | None
    rayjobs: dict[int, dict[str, Any]]
    missing_rayjobs: frozenset[int]
    reports: dict[int, dict[str, Any]]
    model: ModelResolution
    now: datetime


async def reconcile_batch(op: Operator, key: Key) -> float | None:
    s = await observe(op, key)
    if s is None:
        op.batch_queue.forget(key)
        return None
    plan = plan_batch(
        s.bp, s.spec, s.invalid, s.rayjobs, s.now, model=s.model, reports=s.reports, missing_rayjobs=s.missing_rayjobs
    )
    await act(op, s, plan)
    return plan.requeue_after


async def observe(op: Operator, key: Key) -> BatchSnapshot | None:
    obj = op.batches.get(key)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return None
    namespace, name = key
    status = obj.get("status") or {}
    spec, invalid = parse_spec(BatchPredictionSpec, obj.get("spec") or {})
    if spec is not None and invalid is None:
        try:
            validate_batch(obj, spec, int(status.get("lastRun") or 0) + 1)
        except InvalidSpecError as e:
            invalid = str(e)
    rayjobs = rayjobs_by_run(op.rayjobs.in_namespace(namespace, label=LABEL_BATCH, value=name))
    missing = await _confirm_missing(op, namespace, status, rayjobs)
    reports: dict[int, dict[str, Any]] = {}
    if spec is not None:
        outputs = op.outputs_for(spec.output.uri)
        for n in runs_awaiting_report(status, rayjobs):
            try:
                report = await asyncio.to_thread(outputs.read_record, n)
            except (PackageError, OSError) as e:  # unreadable says nothing; the RayJob still does
                log.warning("%s/%s: run %d's outcome record is unreadable: %s", namespace, name, n, e)
                report = None
            if report is not None:
                reports[n] = report
    model = resolve_model(op, namespace, spec) if spec is not None else ModelResolution(None, "invalid spec")
    return BatchSnapshot(key, obj, spec, invalid, rayjobs, frozenset(missing), reports, model, op.clock())


def resolve_model(op: Operator, namespace: str, spec: BatchPredictionSpec) -> ModelResolution:
    """The registry and version a run would score with now, from the spec or the object it names."""
    m = spec.model
    if m.registry_uri and m.name:
        return ModelResolution(ResolvedModel(m.registry_uri, m.name, m.version))
    if m.pipeline:
        pipeline = op.pipelines.get((namespace, m.pipeline))
        if pipeline is None:
            return ModelResolution(None, f"spec.model.pipeline: MLPipeline {m.pipeline} does not exist")
        version = (pipeline.get("status") or {}).get("latestVersion")
        registry = (pipeline.get("spec") or {}).get("registry") or {}
        if not version:
            return ModelResolution(None, f"spec.model.pipeline: MLPipeline {m.pipeline} has no version that passed its gate yet")
        return ModelResolution(ResolvedModel(registry["uri"], registry["modelName"], version))
    deployment = op.deployments.get((namespace, m.model_deployment or ""))
    if deployment is None:
        return ModelResolution(None, f"spec.model.modelDeployment: ModelDeployment {m.model_deployment} does not exist")
    version = (deployment.get("status") or {}).get("stableVersion")
    model = (deployment.get("spec") or {}).get("model") or {}
    if not version:
        return ModelResolution(None, f"spec.model.modelDeployment: ModelDeployment {m.model_deployment} serves no stable version yet")
    return ModelResolution(ResolvedModel(model["registryUri"], model["name"], version))


async def _confirm_missing(op: Operator, namespace: str, status: dict[str, Any], rayjobs: dict[int, dict[str, Any]]) -> set[int]:
    """Active runs whose RayJob the cache lacks: read it live; absent there too means it was deleted."""
    missing: set[int] = set()
    for run in status.get("runs") or []:
        n = run["run"]
        if run.get("outcome") not in ACTIVE or n in rayjobs or not run.get("rayJob"):
            continue
        live = await op.client.get(resource_path("ray.io/v1", "rayjobs", namespace, run["rayJob"]), resource="RayJob")
        if live is None:
            missing.add(n)
            continue
        live.setdefault("apiVersion", "ray.io/v1")
        live.setdefault("kind", "RayJob")
        op.rayjobs.remember(live)
        rayjobs[n] = live
    return missing


async def act(op: Operator, s: BatchSnapshot, plan: BatchPlan) -> None:
    namespace, name = s.key
    if plan.start_run is not None:
        assert s.spec is not None and plan.model is not None
        await _refuse_unknown_rayjobs(op, s)
        created = await op.client.apply(build_rayjob(s.bp, s.spec, plan.start_run, plan.model, plan.start_trigger or ""))
        op.rayjobs.remember(created)
        await op.client.apply(build_run_configmap(s.bp, s.spec, plan.start_run, plan.model, created))
        log.info("%s/%s: batch run %d started (%s)", namespace, name, plan.start_run, plan.start_trigger)
    for rj_name in plan.delete_rayjobs:
        await op.client.delete({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": rj_name, "namespace": namespace}})
    await write_status(op.client, op.batches, s.bp, plan.status)
    op.emit(s.bp, plan.events)


async def _refuse_unknown_rayjobs(op: Operator, s: BatchSnapshot) -> None:
    namespace, name = s.key
    live = await op.client.list(
        resource_path("ray.io/v1", "rayjobs", namespace), label_selector=f"{LABEL_BATCH}={name}", resource="RayJob"
    )
    unknown = [rj for n, rj in rayjobs_by_run(live).items() if n not in s.rayjobs]
    for rj in unknown:
        op.rayjobs.remember(rj)
    if unknown:
        raise Requeue(0.0)
