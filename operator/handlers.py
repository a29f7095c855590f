"""kopf wiring, thin: watch events fill the caches and queue keys; the reconcilers do the rest.

kopf watches MLPipelines, ModelDeployments, BatchPredictions and the children we label (RayJobs, InferenceServices,
and, where the API serves the Gateway API, Standard mode's HTTPRoutes) with `on.event` handlers only: nothing kopf-specific is written to our objects (no finalizers, no
progress annotations). Each event updates the kind's cache and queues the owning object's key.

The package (operator/, imported as conveyor.operator; a namespace portion with no __init__.py, so it
never shadows the standard library's `operator`):
- handlers.py            this wiring; __main__.py the command line
- controller/            what both kinds share: manager.py (the Operator: caches, queues, registries),
                         client.py (the API client), cache.py, workqueue.py, status.py (the one status
                         write), events.py, conditions.py, children.py (ownership, applied-hash),
                         validation.py, metrics.py, times.py
- mlpipeline/            reconcile.py (observe -> plan -> act), plan.py (pure), build.py (the RayJob and
                         its ConfigMap, pure), validate.py, gate.py (the evaluation gate)
- modeldeployment/       reconcile.py, plan.py, build.py (the InferenceService), validate.py
- batchprediction/       reconcile.py, plan.py, build.py (the RayJob of a batch run and its ConfigMap), validate.py
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from typing import Any

import kopf

from conveyor.operator.batchprediction.build import LABEL_BATCH
from conveyor.operator.controller import metrics
from conveyor.operator.controller.cache import ObjectCache
from conveyor.operator.controller.children import FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY
from conveyor.operator.controller.client import ApiClient, ApiError, connection_info, resource_path
from conveyor.operator.controller.leader import LeaderElector
from conveyor.operator.controller.manager import Config, Operator
from conveyor.operator.controller.workqueue import WorkQueue
from conveyor.operator.mlpipeline.build import LABEL_PIPELINE
from conveyor.operator.modeldeployment.build import LABEL_DEPLOYMENT
from conveyor.operator.modeldeployment.route import GATEWAY_API_VERSION, GATEWAY_GROUP
from conveyor.operator.modeldeployment.validate import settled_kserve_mode

log = logging.getLogger("conveyor.operator")
HTTPROUTES_CRD = f"httproutes.{GATEWAY_GROUP}"
HTTPROUTES_VERSION = GATEWAY_API_VERSION.removeprefix(f"{GATEWAY_GROUP}/")  # v1


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
        client = ApiClient(connection_info(settings), field_manager=FIELD_MANAGER)
        client.relogin = functools.partial(connection_info, settings)
        memo.conveyor = Operator(client=client, config=config)
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    op = _op(memo)
    await _discover_gateway_api(op, settings)
    if config.leader_election is None:
        metrics.LEADER.set(1)
        op.start()
    else:
        memo.conveyor_elector = LeaderElector(
            op.client, config.leader_election, on_started=op.start, on_stopped=_step_down(op)
        )
        memo.conveyor_election = asyncio.create_task(memo.conveyor_elector.run(), name="leader-election")
    log.info("conveyor operator started (field manager %s)", FIELD_MANAGER)


async def _discover_gateway_api(op: Operator, settings: kopf.OperatorSettings) -> None:
    """Whether the API serves `gateway.networking.k8s.io/v1` httproutes, asked of discovery before kopf starts
    its watches, so that the first reconciles after a start already know; from then on the HTTPRoute CRD's
    events say so (`on_gateway_api_crd`), where the operator may list and watch CRDs (the chart's
    rbac.clusterDiscovery; without it kopf's watch of them would fail and stop the operator). HTTPRoutes are
    always watched (kopf starts that watch when their CRD appears and stops it when it goes), only those
    labelled with a ModelDeployment (a label selector the apiserver applies): the operator's own and those
    KServe copied the InferenceService's labels onto."""
    settings.watching.label_selectors[GATEWAY_GROUP, "httproutes"] = LABEL_DEPLOYMENT
    try:
        found = await op.client.get(f"/apis/{GATEWAY_API_VERSION}", resource="APIResourceList")
    except ApiError as e:
        log.warning("Gateway API discovery failed (%s): Standard-mode routing is left to KServe", e)
        found = None
    op.gateway_api = any(r.get("name") == "httproutes" for r in (found or {}).get("resources") or [])
    follows = await _may_watch_crds(op)
    if follows:
        global _following_the_crd
        if not _following_the_crd:  # one handler per process, however often the startup runs
            kopf.on.event(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                field="metadata.name",
                value=HTTPROUTES_CRD,
            )(on_gateway_api_crd)
            _following_the_crd = True
    if not op.gateway_api:
        log.info(
            "the API serves no %s httproutes: Standard-mode routing is left to KServe %s",
            GATEWAY_API_VERSION,
            "until it does" if follows else "(a Gateway API installed later is noticed at the next restart)",
        )


_following_the_crd = False


async def _may_watch_crds(op: Operator) -> bool:
    """The operator may list (and, granted together, watch) CustomResourceDefinitions: one LIST of the
    HTTPRoute CRD by name. Only a refusal says no; any other failure leaves it to kopf's own retries."""
    try:
        await op.client.list(
            resource_path("apiextensions.k8s.io/v1", "customresourcedefinitions", None),
            field_selector=f"metadata.name={HTTPROUTES_CRD}",
            resource="CustomResourceDefinition",
        )
    except ApiError as e:
        if e.status in (401, 403):
            log.info("no permission to watch CustomResourceDefinitions (%s)", e)
            return False
        log.warning("could not list CustomResourceDefinitions (%s)", e)
    return True


@kopf.on.event(GATEWAY_GROUP, HTTPROUTES_VERSION, "httproutes")
async def on_route(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    """An HTTPRoute of a ModelDeployment changed or went (someone edited or deleted `<name>-traffic`, or
    KServe wrote one): cache it and reconcile the deployment, which restores its route."""
    op = _op(memo)
    _enqueue_owner(op.routes, event, LABEL_DEPLOYMENT, op.deployment_queue)


async def on_gateway_api_crd(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    """The HTTPRoute CRD installed, changed or removed while the operator runs (a platform team installs a
    gateway after the operator): Standard-mode routing follows it without a restart."""
    served = event.get("type") != "DELETED" and httproutes_served(event.get("object") or {})
    gateway_api_changed(_op(memo), served)


def httproutes_served(crd: dict[str, Any]) -> bool:
    """The HTTPRoute CRD serves v1, the apiserver has established it, and it is not being deleted."""
    if (crd.get("metadata") or {}).get("deletionTimestamp"):
        return False
    versions = (crd.get("spec") or {}).get("versions") or []
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(v.get("name") == HTTPROUTES_VERSION and v.get("served") for v in versions) and any(
        c.get("type") == "Established" and c.get("status") == "True" for c in conditions
    )


def gateway_api_changed(op: Operator, served: bool) -> None:
    """Record whether HTTPRoutes are served; when that flips, reconcile every Standard-mode deployment (it
    takes the split over, or hands it back to KServe). Gone: the cached routes go with it."""
    if served == op.gateway_api:
        return
    op.gateway_api = served
    if not served:
        op.routes = ObjectCache()
    log.info(
        "%s httproutes %s: Standard-mode routing is %s",
        GATEWAY_API_VERSION,
        "served" if served else "no longer served",
        "the operator's" if served else "left to KServe",
    )
    for key, obj in op.deployments.items():
        if kserve_mode(obj, op.isvcs.get(key), op.config.default_kserve_mode) == "Standard":
            op.deployment_queue.add(key)


class _QuietWithoutGatewayApi(logging.Filter):
    """kopf warns at start and on every CRD change that HTTPRoutes "cannot be served (try creating their
    CRDs)" while the Gateway API is absent: here a supported setup that startup states once, not a fault.
    The warning still shows where other resources are unresolved too."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Unresolved resources cannot be served"):
            return True
        unresolved = text.partition("): ")[2]
        only_routes = unresolved.count("Selector(") == 1 and "'httproutes'" in unresolved
        return not (only_routes and f"'{GATEWAY_GROUP}'" in unresolved)


logging.getLogger("kopf._core.reactor.observation").addFilter(_QuietWithoutGatewayApi())


def kserve_mode(deployment: dict[str, Any], isvc: dict[str, Any] | None, default: str) -> str:
    """A ModelDeployment's KServe mode as its reconcile settles it (validate.with_kserve_mode), from the raw
    object."""
    mode = ((deployment.get("spec") or {}).get("rollout") or {}).get("mode")
    return settled_kserve_mode(mode, isvc, default)


def _step_down(op: Operator) -> Any:
    async def stop_reconciling_and_exit() -> None:
        # Stop writing before another replica may take over, then exit: Kubernetes restarts this one as a follower.
        await op.pipeline_queue.stop()
        await op.deployment_queue.stop()
        await op.batch_queue.stop()
        os.kill(os.getpid(), signal.SIGTERM)

    return stop_reconciling_and_exit


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    election = getattr(memo, "conveyor_election", None)
    if election is not None:
        election.cancel()
        await memo.conveyor_elector.release()
    await _op(memo).stop()


@kopf.on.probe(id="queued")
def probe_queue(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    op = _op(memo)
    return {
        "pipelines": len(op.pipeline_queue),
        "deployments": len(op.deployment_queue),
        "batches": len(op.batch_queue),
    }


_MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}


@kopf.on.event("conveyor.dev", "v1alpha1", "mlpipelines")
async def on_pipeline(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj = op.pipelines.observe(event)
    if obj is None:
        return
    namespace = obj["metadata"]["namespace"]
    op.pipeline_queue.add((namespace, obj["metadata"]["name"]))
    for md_key in op.deployments_following(namespace, obj):
        op.deployment_queue.add(md_key)


@kopf.on.event("conveyor.dev", "v1alpha1", "modeldeployments")
async def on_deployment(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj = op.deployments.observe(event)
    if obj is not None:
        op.deployment_queue.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))


@kopf.on.event("conveyor.dev", "v1alpha1", "batchpredictions")
async def on_batch(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj = op.batches.observe(event)
    if obj is not None:
        op.batch_queue.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))


@kopf.on.event("ray.io", "v1", "rayjobs", labels=_MANAGED)
async def on_rayjob(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    # A RayJob is a training run (labelled with its pipeline) or a batch run (with its BatchPrediction).
    _enqueue_owner(op.rayjobs, event, LABEL_PIPELINE, op.pipeline_queue)
    _enqueue_labelled(event, LABEL_BATCH, op.batch_queue)


@kopf.on.event("serving.kserve.io", "v1beta1", "inferenceservices", labels=_MANAGED)
async def on_inference_service(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    _enqueue_owner(op.isvcs, event, LABEL_DEPLOYMENT, op.deployment_queue)


def _enqueue_labelled(event: dict[str, Any], owner_label: str, queue: WorkQueue[Any]) -> None:
    obj = event.get("object") or {}
    owner = (obj.get("metadata", {}).get("labels") or {}).get(owner_label)
    if owner and obj["metadata"].get("namespace"):
        queue.add((obj["metadata"]["namespace"], owner))


def _enqueue_owner(
    cache: ObjectCache, event: dict[str, Any], owner_label: str, queue: WorkQueue[Any]
) -> None:
    """A child changed: cache it and reconcile the object its label names (same namespace)."""
    child = cache.observe(event)
    owner = ((child or {}).get("metadata", {}).get("labels") or {}).get(owner_label)
    if child is not None and owner:
        queue.add((child["metadata"]["namespace"], owner))
