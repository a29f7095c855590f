"""The operator: what both kinds' reconcilers share, built once at startup and kept in kopf's memo.

It holds the API client, one `ObjectCache` per watched kind (HTTPRoutes only where the API serves them),
one `WorkQueue` per reconciled kind, the registry handles and the event poster. Each kind's reconcile
lives in its own package (`mlpipeline/reconcile.py`, `modeldeployment/reconcile.py`) as observe -> plan ->
act over this object; the kopf handlers (handlers.py) only feed the caches and the queues.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from conveyor.operator.controller import metrics
from conveyor.operator.controller.cache import Key, ObjectCache, keep_spec_fields
from conveyor.operator.controller.client import Client, resource_path
from conveyor.operator.controller.events import Event, EventPoster
from conveyor.operator.controller.leader import LeaseConfig
from conveyor.operator.controller.prometheus import Prometheus
from conveyor.operator.controller.validation import known_readable, validate_registry
from conveyor.operator.controller.workqueue import WorkQueue

# How old a namespace's list of Warning events may be when a stalled run reads it (it is rechecked every
# 15 s; a fault must show in its status within the minute).
WARNINGS_MAX_AGE = 5.0


def _track(active: set[Key], gauge: Any, key: Key, is_active: bool) -> None:
    """Keep `key` in the set of active objects or not, and set `gauge` to how many there are."""
    if is_active:
        active.add(key)
    else:
        active.discard(key)
    gauge.set(len(active))


@dataclass
class Config:
    pipeline_workers: int = 16
    deployment_workers: int = 16
    resync_seconds: float = 600.0
    registry_poll_seconds: float = 60.0
    metrics_port: int | None = None
    # The KServe mode of a ModelDeployment that names none (Helm: operator.defaultKServeMode).
    default_kserve_mode: str = "Knative"
    # With a Lease: several replicas, one reconciling (Helm: replicas > 1). None: this replica reconciles.
    leader_election: LeaseConfig | None = None
    # Prometheus that rollout analysis and drift read (Helm sets CONVEYOR_PROMETHEUS_URL); None: no analysis.
    prometheus_url: str | None = None
    # The Gateway (`namespace/name`) the operator's weighted Standard-mode HTTPRoutes attach to (Helm:
    # operator.standardGateway; modeldeployment/route.py); "": KServe exposes Standard mode unsplit.
    standard_gateway: str = "kserve/kserve-ingress-gateway"


def open_registry(uri: str, name: str) -> Any:
    """The registry of a model (fsspec: file://, s3://, gs://); raises ValueError/ImportError when this
    install cannot open the URI (s3:// without the s3 extra)."""
    from conveyor.runtime.package.registry import Registry

    return Registry(uri, name)


def open_outputs(uri: str) -> Any:
    """A BatchPrediction's output storage (its runs' outcome records), fsspec as the registry."""
    from conveyor.runtime.package.outputs import BatchOutputs

    return BatchOutputs(uri)


@dataclass
class Operator:
    client: Client
    config: Config = field(default_factory=Config)
    registry_for: Callable[[str, str], Any] = open_registry
    outputs_for: Callable[[str], Any] = open_outputs
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    pipelines: ObjectCache = field(default_factory=ObjectCache)
    deployments: ObjectCache = field(default_factory=ObjectCache)
    # Of a RayJob the reconcilers read metadata, status and spec.suspend only (runs.py, blockers.py).
    rayjobs: ObjectCache = field(default_factory=lambda: ObjectCache(project=keep_spec_fields("suspend")))
    isvcs: ObjectCache = field(default_factory=ObjectCache)
    # Standard mode's HTTPRoutes labelled with a ModelDeployment (the operator's and any KServe wrote),
    # watched only where the API serves them: `gateway_api` says so (discovery at startup, handlers.py).
    routes: ObjectCache = field(default_factory=ObjectCache)
    gateway_api: bool = False
    batches: ObjectCache = field(default_factory=ObjectCache)
    # Committed registry versions never change: a positive lookup is cached for good.
    known_versions: set[tuple[str, str, str]] = field(default_factory=set)
    # Built from config.prometheus_url unless given (tests point it at a local server).
    prometheus: Prometheus | None = None
    pipeline_queue: WorkQueue[Key] = field(init=False)
    deployment_queue: WorkQueue[Key] = field(init=False)
    batch_queue: WorkQueue[Key] = field(init=False)

    def __post_init__(self) -> None:
        from conveyor.operator.batchprediction.reconcile import reconcile_batch
        from conveyor.operator.mlpipeline.reconcile import reconcile_pipeline
        from conveyor.operator.modeldeployment.reconcile import reconcile_deployment

        async def pipeline(key: Key) -> float | None:
            return await reconcile_pipeline(self, key)

        async def deployment(key: Key) -> float | None:
            return await reconcile_deployment(self, key)

        self.pipeline_queue = WorkQueue("MLPipeline", pipeline, workers=self.config.pipeline_workers)
        self.deployment_queue = WorkQueue(
            "ModelDeployment", deployment, workers=self.config.deployment_workers
        )

        async def batch(key: Key) -> float | None:
            return await reconcile_batch(self, key)

        self.batch_queue = WorkQueue("BatchPrediction", batch, workers=self.config.pipeline_workers)
        self._registries: dict[tuple[str, str], Any] = {}
        self._events = EventPoster(self.client)
        if self.prometheus is None and self.config.prometheus_url:
            self.prometheus = Prometheus(self.config.prometheus_url)
        self._resync_task: asyncio.Task[None] | None = None
        self._warnings: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._warnings_lock = asyncio.Lock()
        self._active_runs: set[Key] = set()
        self._active_rollouts: set[Key] = set()

    def registry(self, uri: str, name: str) -> Any:
        key = (uri, name)
        if key not in self._registries:
            self._registries[key] = self.registry_for(uri, name)
        return self._registries[key]

    def emit(self, obj: dict[str, Any], events: list[Event]) -> None:
        self._events.post(obj, events)

    async def warning_events(self, namespace: str, max_age: float = WARNINGS_MAX_AGE) -> list[dict[str, Any]]:
        """The Warning events of a namespace (a field selector: the apiserver filters them), read at most
        once per `max_age` seconds and shared by every stalled run that looks for why it does not start
        (a thousand pending runs would otherwise each list every event of the namespace, every recheck)."""
        async with self._warnings_lock:
            read = self._warnings.get(namespace)
            if read is None or time.monotonic() - read[0] >= max_age:
                events = await self.client.list(
                    resource_path("v1", "events", namespace), field_selector="type=Warning", resource="Event"
                )
                read = self._warnings[namespace] = (time.monotonic(), events)
            return read[1]

    def deployments_following(self, namespace: str, pipeline: dict[str, Any]) -> list[Key]:
        """ModelDeployments that take this pipeline's versions (named by it, or naming it)."""
        name = pipeline["metadata"]["name"]
        target = ((pipeline.get("spec") or {}).get("deploy") or {}).get("modelDeployment")
        return [
            (namespace, md["metadata"]["name"])
            for md in self.deployments.in_namespace(namespace)
            if md["metadata"]["name"] == target
            or ((md.get("spec") or {}).get("model") or {}).get("pipeline") == name
        ]

    def note_run(self, key: Key, status: dict[str, Any] | None) -> None:
        """A pipeline's status as last written (None: it is gone), for the active-runs gauge: kept per key,
        not counted over the whole cache after each reconcile (quadratic in the number of objects)."""
        active = status is not None and status.get("activeRun") is not None
        _track(self._active_runs, metrics.ACTIVE_RUNS, key, active)

    def note_rollout(self, key: Key, status: dict[str, Any] | None) -> None:
        """A ModelDeployment's status as last written (None: it is gone), for the active-rollouts gauge."""
        _track(self._active_rollouts, metrics.ACTIVE_ROLLOUTS, key, bool(status and status.get("canaryVersion")))

    async def registry_problem(self, uri: str, name: str, field: str) -> str | None:
        """validate_registry, in a thread only when this process has not yet read that registry (the
        answer is then known without any I/O: one hop to a thread per reconcile was a measurable part of
        a burst's CPU)."""
        opened = self._registries.get((uri, name))
        if opened is not None and known_readable(opened):
            return None
        return await asyncio.to_thread(validate_registry, self.registry, uri, name, field)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.pipeline_queue.start()
        self.deployment_queue.start()
        self.batch_queue.start()
        self._resync_task = asyncio.create_task(self._resync(), name="resync")

    async def _resync(self) -> None:
        """Every so often, look at every object again (a missed watch event heals; nothing unchanged is written)."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for key in self.pipelines:
                self.pipeline_queue.add(key)
            for key in self.deployments:
                self.deployment_queue.add(key)
            for key in self.batches:
                self.batch_queue.add(key)

    async def stop(self) -> None:
        await self._events.drain()
        if self._resync_task is not None:
            self._resync_task.cancel()
        await self.pipeline_queue.stop()
        await self.deployment_queue.stop()
        await self.batch_queue.stop()
        await self.client.close()
        if self.prometheus is not None:
            await self.prometheus.close()
