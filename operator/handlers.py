"""kopf wiring: watch events fill a cache and queue keys; reconcilers act on whole objects.

kopf watches MLPipelines, ModelDeployments and the children we label (RayJobs, InferenceServices)
with `on.event` handlers only: nothing kopf-specific is written to our objects (no finalizers, no
progress annotations). Each event updates the in-memory cache and queues the owning object's key;
`reconcile_pipeline` / `reconcile_deployment` read the cache, call the pure planners
(pipeline.py, deployment.py), apply children with server-side apply, write status once (only if it
changed) and post Events. Everything that talks to the outside (the API client, the registry) hangs
off `Operator`, set in kopf's memo at startup.

The package (operator/, imported as conveyor.operator; a namespace portion with no __init__.py, so it
never shadows the standard library's `operator`):
- handlers.py   this wiring and the two reconcilers
- pipeline.py   MLPipeline -> runs, triggers, RayJob states, gate outcomes, conditions (pure)
- deployment.py ModelDeployment -> stable/canary versions, the hand-off from pipelines, status (pure)
- builders.py   RayJob, run ConfigMap and InferenceService manifests (pure)
- gate.py       the evaluation gate over the registry's package metadata
- conditions.py condition types and their meaning
- kube.py, workqueue.py, metrics.py  the API client, the level-triggered queue, Prometheus metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import BaseModel, ValidationError

from conveyor.operator import builders, metrics
from conveyor.operator.deployment import Resolution, kserve_mode_conflict, plan_deployment, with_kserve_mode
from conveyor.operator.gate import evaluate_gate, find_run_version, numeric_metrics
from conveyor.operator.kube import Conflict, Kube, connection_info, merge_patch, resource_path
from conveyor.operator.pipeline import (
    ACTIVE,
    DeployTarget,
    GateOutcome,
    plan_pipeline,
    rayjobs_by_run,
    runs_awaiting_gate,
)
from conveyor.operator.workqueue import Requeue, WorkQueue
from conveyor.runtime.spec import MLPipelineSpec, ModelDeploymentSpec

log = logging.getLogger("conveyor.operator")

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Config:
    pipeline_workers: int = 2
    deployment_workers: int = 16
    resync_seconds: float = 600.0
    registry_poll_seconds: float = 60.0
    metrics_port: int | None = None
    # The KServe mode of a ModelDeployment that names none (Helm: operator.defaultKServeMode).
    default_kserve_mode: str = "Knative"


def _registry_factory(uri: str, name: str) -> Any:
    from conveyor.runtime.registry import Registry

    return Registry(uri, name)


@dataclass
class Operator:
    """What the reconcilers share: the API client, the cache, the queues and the registry access."""

    kube: Kube
    config: Config = field(default_factory=Config)
    registry_for: Callable[[str, str], Any] = _registry_factory
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    pipelines: dict[Key, dict[str, Any]] = field(default_factory=dict)
    deployments: dict[Key, dict[str, Any]] = field(default_factory=dict)
    rayjobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    isvcs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    known_versions: set[tuple[str, str, str]] = field(default_factory=set)
    pipeline_queue: WorkQueue = field(init=False)
    deployment_queue: WorkQueue = field(init=False)

    def __post_init__(self) -> None:
        self.pipeline_queue = WorkQueue("MLPipeline", self.reconcile_pipeline, workers=self.config.pipeline_workers)
        self.deployment_queue = WorkQueue(
            "ModelDeployment", self.reconcile_deployment, workers=self.config.deployment_workers
        )
        self._registries: dict[tuple[str, str], Any] = {}
        self._events: asyncio.Queue[tuple[dict[str, Any], str, str, str]] = asyncio.Queue()
        self._poster: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- cache

    @staticmethod
    def _store(store: dict[Key, dict[str, Any]], obj: dict[str, Any]) -> None:
        """Keep the newest copy: a write's response may arrive before an older watch event."""
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        old = store.get(key)
        if old is not None and old["metadata"].get("uid") == meta.get("uid"):
            try:
                if int(old["metadata"]["resourceVersion"]) > int(meta["resourceVersion"]):
                    return
            except (KeyError, ValueError):
                pass
        store[key] = obj

    def observe(self, store: dict[Key, dict[str, Any]], event: dict[str, Any]) -> dict[str, Any] | None:
        obj = event.get("object")
        if not obj or "metadata" not in obj:
            return None
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if event.get("type") == "DELETED":
            store.pop(key, None)
        else:
            self._store(store, obj)
        return obj

    def rayjobs_of(self, namespace: str, pipeline: str) -> dict[int, dict[str, Any]]:
        return rayjobs_by_run(
            [
                rj
                for (ns, _), rj in self.rayjobs.items()
                if ns == namespace and (rj["metadata"].get("labels") or {}).get(builders.LABEL_PIPELINE) == pipeline
            ]
        )

    def deployments_following(self, namespace: str, pipeline: dict[str, Any]) -> list[Key]:
        name = pipeline["metadata"]["name"]
        target = ((pipeline.get("spec") or {}).get("deploy") or {}).get("modelDeployment")
        keys = []
        for (ns, md_name), md in self.deployments.items():
            if ns != namespace:
                continue
            if md_name == target or ((md.get("spec") or {}).get("model") or {}).get("pipeline") == name:
                keys.append((ns, md_name))
        return keys

    def registry(self, uri: str, name: str) -> Any:
        key = (uri, name)
        if key not in self._registries:
            self._registries[key] = self.registry_for(uri, name)
        return self._registries[key]

    def update_gauges(self) -> None:
        metrics.ACTIVE_RUNS.set(
            sum(1 for p in self.pipelines.values() if (p.get("status") or {}).get("activeRun") is not None)
        )
        metrics.ACTIVE_ROLLOUTS.set(
            sum(1 for d in self.deployments.values() if (d.get("status") or {}).get("canaryVersion"))
        )

    # ---------------------------------------------------------------- shared steps

    async def write_status(self, store: dict[Key, dict[str, Any]], obj: dict[str, Any], status: dict[str, Any]) -> bool:
        patch = merge_patch(obj.get("status") or {}, status)
        if patch is None:
            return False
        try:
            updated = await self.kube.patch_status(obj, patch)
        except Conflict:
            # Someone changed the object since we read it: read it again and reconcile anew.
            fresh = await self.kube.get(
                resource_path(obj["apiVersion"], _plural(obj), obj["metadata"]["namespace"], obj["metadata"]["name"])
            )
            if fresh is not None:
                self._store(store, fresh)
            raise Requeue(0.05) from None
        self._store(store, updated)
        return True

    async def emit(self, obj: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
        """Queue the events for one background poster: they are best-effort, the worker moves on, and a
        burst of them (200 new objects) does not crowd out the writes that matter."""
        for type_, reason, message in events:
            self._events.put_nowait((obj, type_, reason, message))
        if events and (self._poster is None or self._poster.done()):
            self._poster = asyncio.create_task(self._post_events(), name="events")

    async def _post_events(self) -> None:
        while True:
            obj, type_, reason, message = await self._events.get()
            try:
                await self.kube.event(obj, type_, reason, message)
            finally:
                self._events.task_done()

    # ---------------------------------------------------------------- MLPipeline

    async def reconcile_pipeline(self, key: Hashable) -> float | None:
        assert isinstance(key, tuple)
        obj = self.pipelines.get(key)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self.pipeline_queue.forget(key)
            return None
        namespace, name = key
        spec, invalid = _parse(MLPipelineSpec, obj.get("spec") or {})
        if spec is not None and invalid is None:
            try:  # what the schema cannot see: names KubeRay would refuse, duplicate groups
                builders.build_rayjob(obj, spec, int((obj.get("status") or {}).get("lastRun") or 0) + 1)
            except builders.InvalidSpecError as e:
                invalid = str(e)
        if spec is not None and invalid is None:
            try:
                self.registry(spec.registry.uri, spec.registry.model_name)
            except (ValueError, ImportError) as e:  # e.g. s3:// without the s3 extra installed
                invalid = f"spec.registry.uri: cannot open {spec.registry.uri}: {e}"
        status = obj.get("status") or {}
        rayjobs = self.rayjobs_of(namespace, name)

        # A RayJob of an active run missing from the cache: not listed yet (startup), or deleted.
        missing: set[int] = set()
        for run in status.get("runs") or []:
            n = run["run"]
            if run.get("outcome") in ACTIVE and n not in rayjobs:
                live = await self.kube.get(
                    resource_path("ray.io/v1", "rayjobs", namespace, builders.rayjob_name(name, n)), resource="RayJob"
                )
                if live is None:
                    missing.add(n)
                else:
                    live.setdefault("apiVersion", "ray.io/v1")
                    live.setdefault("kind", "RayJob")
                    self._store(self.rayjobs, live)
                    rayjobs[n] = live

        deploy_target = self._deploy_target(namespace, name, spec) if spec is not None else None
        gate: dict[int, GateOutcome] = {}
        for n in runs_awaiting_gate(status, rayjobs) if spec is not None else []:
            gate[n] = await asyncio.to_thread(self._gate_run, spec, namespace, name, n, deploy_target)

        now = self.clock()
        plan = plan_pipeline(
            obj, spec, invalid, rayjobs, gate, now, missing_rayjobs=frozenset(missing), deploy_target=deploy_target
        )
        if plan.start_run is not None:
            # Before creating, ask the apiserver itself: the cache may lag behind a RayJob made just
            # before a restart. Adopting it is what keeps one RayJob per run.
            live_jobs = await self.kube.list(
                resource_path("ray.io/v1", "rayjobs", namespace),
                label_selector=f"{builders.LABEL_PIPELINE}={name}",
                resource="RayJob",
            )
            for rj in live_jobs:
                self._store(self.rayjobs, rj)
            fresh = rayjobs_by_run(live_jobs)
            if any(n not in rayjobs for n in fresh):
                rayjobs.update(fresh)
                plan = plan_pipeline(
                    obj, spec, invalid, rayjobs, gate, now, missing_rayjobs=frozenset(missing), deploy_target=deploy_target
                )
        if plan.start_run is not None:
            assert spec is not None
            created = await self.kube.apply(builders.build_rayjob(obj, spec, plan.start_run, plan.start_trigger or ""))
            self._store(self.rayjobs, created)
            await self.kube.apply(builders.build_run_configmap(obj, spec, plan.start_run, created))
            log.info("%s/%s: run %d started (%s)", namespace, name, plan.start_run, plan.start_trigger)
        for rj_name in plan.delete_rayjobs:
            await self.kube.delete({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": rj_name, "namespace": namespace}})
        wrote = await self.write_status(self.pipelines, obj, plan.status)
        for run in plan.status.get("runs") or []:  # counted once: only after the status recorded it
            before = next((r for r in status.get("runs") or [] if r.get("run") == run["run"]), None)
            if run.get("outcome") not in ACTIVE and (before is None or before.get("outcome") in ACTIVE):
                metrics.RUNS_FINISHED.labels(run.get("outcome", "")).inc()
        log.debug(
            "%s/%s: reconciled (rv %s, active %s, start %s, status written %s)",
            namespace, name, obj["metadata"].get("resourceVersion"), plan.status.get("activeRun"), plan.start_run, wrote,
        )
        await self.emit(obj, plan.events)
        if plan.status.get("latestVersion") != status.get("latestVersion"):
            for md_key in self.deployments_following(namespace, obj):
                self.deployment_queue.add(md_key)
        self.update_gauges()
        return plan.requeue_after

    def _deploy_target(self, namespace: str, pipeline: str, spec: MLPipelineSpec) -> DeployTarget | None:
        if spec.deploy is None:
            return None
        name = spec.deploy.model_deployment
        md = self.deployments.get((namespace, name))
        if md is None:
            return DeployTarget(name, exists=False, follows=False)
        model = (md.get("spec") or {}).get("model") or {}
        version = model.get("version", "latest")
        follows = version == "latest" and model.get("pipeline") in (None, pipeline)
        pinned = version if version != "latest" else f"latest of MLPipeline {model.get('pipeline')}"
        return DeployTarget(name, exists=True, follows=follows, pinned_version=None if follows else pinned)

    def _gate_run(
        self, spec: MLPipelineSpec, namespace: str, pipeline: str, run: int, target: DeployTarget | None
    ) -> GateOutcome:
        """Blocking registry reads (run in a thread): the run's package, the deployed one, the verdict."""
        registry = self.registry(spec.registry.uri, spec.registry.model_name)
        found = find_run_version(registry, pipeline=pipeline, namespace=namespace, run=run)
        if found is None:
            return GateOutcome(None, {}, None)
        version, metadata = found
        deployed_version = deployed = None
        if spec.evaluation.must_beat_deployed and target is not None and target.exists:
            md = self.deployments.get((namespace, target.name)) or {}
            deployed_version = (md.get("status") or {}).get("stableVersion")
            model = (md.get("spec") or {}).get("model") or {}
            if deployed_version and model.get("registryUri") and model.get("name"):
                from conveyor.runtime.registry import PackageError

                try:
                    deployed = self.registry(model["registryUri"], model["name"]).read_metadata(deployed_version)
                except PackageError:
                    deployed = None
        result = evaluate_gate(spec.evaluation, metadata, deployed_version=deployed_version, deployed=deployed)
        return GateOutcome(version, numeric_metrics(metadata), result)

    # ---------------------------------------------------------------- ModelDeployment

    async def reconcile_deployment(self, key: Hashable) -> float | None:
        assert isinstance(key, tuple)
        obj = self.deployments.get(key)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self.deployment_queue.forget(key)
            return None
        namespace, name = key
        spec, invalid = _parse(ModelDeploymentSpec, obj.get("spec") or {})
        isvc = self.isvcs.get(key)
        if spec is not None:
            invalid = invalid or kserve_mode_conflict(spec, isvc)
            spec = with_kserve_mode(spec, isvc, self.config.default_kserve_mode)
        resolution = None
        uri_for: Callable[[str], str] = lambda v: v  # noqa: E731 - replaced below when the spec parses
        if spec is not None and invalid is None:
            try:
                registry = self.registry(spec.model.registry_uri, spec.model.name)
            except (ValueError, ImportError) as e:  # e.g. s3:// without the s3 extra installed
                invalid = f"spec.model.registryUri: cannot open {spec.model.registry_uri}: {e}"
            else:
                uri_for = registry.package_uri
                resolution = await self._resolve(namespace, name, spec, registry)
        plan = plan_deployment(obj, spec, invalid, resolution, isvc, uri_for, self.clock())
        if plan.inference_service is not None:
            applied = await self.kube.apply(plan.inference_service)
            self._store(self.isvcs, applied)
        await self.write_status(self.deployments, obj, plan.status)
        await self.emit(obj, plan.events)
        self.update_gauges()
        if resolution is not None and resolution.source == "registry":
            # Nothing announces a new registry version: look again now and then (reads only).
            return self.config.registry_poll_seconds
        return None

    async def _resolve(self, namespace: str, name: str, spec: ModelDeploymentSpec, registry: Any) -> Resolution:
        model = spec.model
        if model.version != "latest":
            if await asyncio.to_thread(self._version_exists, registry, model.registry_uri, model.name, model.version):
                return Resolution(model.version, "pinned")
            return Resolution(
                None,
                "pinned",
                "VersionNotFound",
                f"spec.model.version {model.version} is not a committed version of {model.name} in {model.registry_uri}",
                degraded=True,
            )
        if model.pipeline:
            sources = [model.pipeline]
        else:
            sources = [
                p_name
                for (ns, p_name), p in self.pipelines.items()
                if ns == namespace and (((p.get("spec") or {}).get("deploy") or {}).get("modelDeployment") == name)
            ]
        if len(sources) > 1:
            return Resolution(
                None,
                "pipelines",
                "AmbiguousPipeline",
                f"MLPipelines {', '.join(sorted(sources))} all deploy to {name}; set spec.model.pipeline to choose one",
                degraded=True,
            )
        if sources:
            pipeline = self.pipelines.get((namespace, sources[0]))
            if pipeline is None:
                return Resolution(None, f"pipeline {sources[0]}", "PipelineNotFound", f"MLPipeline {sources[0]} does not exist")
            version = (pipeline.get("status") or {}).get("latestVersion")
            if not version:
                return Resolution(
                    None,
                    f"pipeline {sources[0]}",
                    "AwaitingModel",
                    f"Waiting for MLPipeline {sources[0]} to pass a version through its evaluation gate.",
                )
            return Resolution(version, f"pipeline {sources[0]}")
        latest = await asyncio.to_thread(registry.latest)
        if latest is None:
            return Resolution(None, "registry", "NoModelVersion", f"{model.registry_uri} holds no version of {model.name} yet")
        return Resolution(latest, "registry")

    def _version_exists(self, registry: Any, uri: str, model: str, version: str) -> bool:
        # Committed versions never change, so a positive answer is cached for good.
        if (uri, model, version) in self.known_versions:
            return True
        # Committed (manifest valid, every file there at its size); the predictor verifies checksums at load.
        if version in registry.versions(verify=False):
            self.known_versions.add((uri, model, version))
            return True
        return False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.pipeline_queue.start()
        self.deployment_queue.start()
        self._resync_task = asyncio.create_task(self._resync(), name="resync")

    async def _resync(self) -> None:
        """Every so often, look at every object again (a missed watch event heals; nothing unchanged is written)."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for key in list(self.pipelines):
                self.pipeline_queue.add(key)
            for key in list(self.deployments):
                self.deployment_queue.add(key)

    async def stop(self) -> None:
        if self._poster is not None:  # let the last events out, then stop the poster
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._events.join(), timeout=5)
            self._poster.cancel()
        resync = getattr(self, "_resync_task", None)
        if resync is not None:
            resync.cancel()
        await self.pipeline_queue.stop()
        await self.deployment_queue.stop()
        await self.kube.close()


def _plural(obj: dict[str, Any]) -> str:
    from conveyor.operator.kube import PLURALS

    return PLURALS[(obj["apiVersion"], obj["kind"])]


def _parse(model: type[BaseModel], spec: dict[str, Any]) -> tuple[Any, str | None]:
    """The typed spec, or (None, a message naming each bad field)."""
    try:
        return model.model_validate(spec), None
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            problems.append(f"spec.{loc}: {err['msg']}")
        return None, "; ".join(problems)


# ---------------------------------------------------------------- kopf handlers (thin)


def _op(memo: Any) -> Operator:
    return memo.conveyor


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    return connection_info(settings)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Watches that silently stall (kopf issues 585, 810): bound every watch request on both sides.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 30
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 30
    # kopf would post a k8s Event per handler log line: we post our own, on transitions only.
    settings.posting.enabled = False
    config: Config = getattr(memo, "config", None) or Config()
    if getattr(memo, "conveyor", None) is None:
        kube = Kube(connection_info(settings), field_manager=builders.FIELD_MANAGER)
        kube.relogin = functools.partial(connection_info, settings)
        memo.conveyor = Operator(kube=kube, config=config)
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    _op(memo).start()
    log.info("conveyor operator started (field manager %s)", builders.FIELD_MANAGER)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await _op(memo).stop()


@kopf.on.probe(id="queued")
def probe_queue(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    op = _op(memo)
    return {"pipelines": len(op.pipeline_queue), "deployments": len(op.deployment_queue)}


_MANAGED = {builders.LABEL_MANAGED_BY: builders.MANAGED_BY}


@kopf.on.event("conveyor.dev", "v1alpha1", "mlpipelines")
async def on_pipeline(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj = op.observe(op.pipelines, event)
    if obj is None:
        return
    key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
    op.pipeline_queue.add(key)
    for md_key in op.deployments_following(key[0], obj):
        op.deployment_queue.add(md_key)


@kopf.on.event("conveyor.dev", "v1alpha1", "modeldeployments")
async def on_deployment(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj = op.observe(op.deployments, event)
    if obj is None:
        return
    key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
    op.deployment_queue.add(key)


@kopf.on.event("ray.io", "v1", "rayjobs", labels=_MANAGED)
async def on_rayjob(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    _enqueue_owner(op.observe(op.rayjobs, event), builders.LABEL_PIPELINE, op.pipeline_queue)


@kopf.on.event("serving.kserve.io", "v1beta1", "inferenceservices", labels=_MANAGED)
async def on_inference_service(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    _enqueue_owner(op.observe(op.isvcs, event), builders.LABEL_DEPLOYMENT, op.deployment_queue)


def _enqueue_owner(child: dict[str, Any] | None, owner_label: str, queue: WorkQueue) -> None:
    """A child changed: reconcile the object its label names (same namespace)."""
    owner = ((child or {}).get("metadata", {}).get("labels") or {}).get(owner_label)
    if owner:
        queue.add((child["metadata"]["namespace"], owner))

