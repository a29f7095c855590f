"""Why a run's Ray cluster is not starting, from what the cluster itself says: pure, unit-tested.

A RayJob whose pods cannot be made or placed stays `Initializing` for ever (KubeRay retries quietly), so
a run that has been pending for `STALLED_AFTER` gets its RayCluster's conditions and the Warning events
on its RayJob, submitter Job, RayCluster and pods (the scheduler's FailedScheduling, a kubelet's pull
failures), read once, and `start_blocker` names the first thing in the way. Events, not the pods
themselves: the operator is granted no read of pods (their specs can carry secrets' values).

- PodsForbidden: pod creation refused (Pod Security admission, an admission webhook, RBAC);
- QuotaExceeded: a ResourceQuota refused a pod;
- Unschedulable: the scheduler found no node (its own message: resources, taints, selectors);
- ImagePullFailed: a kubelet cannot pull an image.

Queued is not a fault but a wait: a run whose RayJob names a Kueue LocalQueue is created suspended by
Kueue's webhook and unsuspended when Kueue admits it. While it is suspended, `queue_blocker` reads its
Workload's conditions (Kueue's own words: QuotaReserved False with its reason, e.g. Pending "couldn't
assign flavors ... insufficient unused quota", Evicted, admission checks pending) into reason Queued.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# How long a run may wait for its pods before the operator looks for why (a cluster with no trouble
# creates and places them in seconds; a reason must reach the status within the minute).
STALLED_AFTER = 20.0

PODS_FORBIDDEN = "PodsForbidden"
QUOTA_EXCEEDED = "QuotaExceeded"
UNSCHEDULABLE = "Unschedulable"
IMAGE_PULL_FAILED = "ImagePullFailed"
BLOCKED_REASONS = (PODS_FORBIDDEN, QUOTA_EXCEEDED, UNSCHEDULABLE, IMAGE_PULL_FAILED)
QUEUED = "Queued"

_IMAGE_PULL = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")


@dataclass(frozen=True)
class StartBlocker:
    reason: str
    message: str


def _refusal(message: str, subject: str) -> StartBlocker | None:
    text = message.lower()
    if "exceeded quota" in text:
        return StartBlocker(QUOTA_EXCEEDED, f"{subject}: {message}")
    if "forbidden" in text:
        return StartBlocker(PODS_FORBIDDEN, f"{subject}: {message}")
    return None


def start_blocker(raycluster: dict[str, Any] | None, events: Iterable[dict[str, Any]]) -> StartBlocker | None:
    """The first reason the run's pods are not up, or None when nothing says so (yet). `events` are the
    Warning events on the run's objects and pods, the newest first."""
    for cond in ((raycluster or {}).get("status") or {}).get("conditions") or []:
        # KubeRay's ReplicaFailure carries the apiserver's refusal of a head or worker pod.
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            found = _refusal(cond.get("message") or "", f"KubeRay cannot create the pods ({cond.get('reason')})")
            if found:
                return found
    for event in events:
        if event.get("type") != "Warning":
            continue
        obj, reason, message = event.get("involvedObject") or {}, event.get("reason") or "", event.get("message") or ""
        subject = f"{obj.get('kind')} {obj.get('name')}"
        if reason == "FailedScheduling":
            return StartBlocker(UNSCHEDULABLE, f"{subject}: {message}")
        if any(k in message for k in _IMAGE_PULL) or "pull image" in message or "pulling image" in message:
            return StartBlocker(IMAGE_PULL_FAILED, f"{subject} ({reason}): {message}")
        found = _refusal(message, f"{subject} ({reason})")
        if found:
            return found
    return None


def _condition(workload: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (workload.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def queue_blocker(queue: str, workloads: list[dict[str, Any]]) -> StartBlocker | None:
    """Why Kueue has not admitted a suspended run, from its Workload's conditions; None once admitted
    (or finished). `workloads` are the Workloads Kueue made for the run's RayJob (normally one)."""
    where = f"Kueue holds it in LocalQueue {queue}"
    if not workloads:
        return StartBlocker(QUEUED, f"{where}: no Workload yet (Kueue has not seen the RayJob)")
    wl = workloads[0]

    def true(type_: str) -> dict[str, Any] | None:
        cond = _condition(wl, type_)
        return cond if cond is not None and cond.get("status") == "True" else None

    if true("Finished") or true("Admitted"):
        return None
    evicted = true("Evicted")
    if evicted and not true("QuotaReserved"):
        return StartBlocker(QUEUED, f"{where}, evicted ({evicted.get('reason')}): {evicted.get('message') or ''}".rstrip(": "))
    if true("QuotaReserved"):
        return StartBlocker(QUEUED, f"{where}: quota reserved, waiting for its admission checks")
    reserved = _condition(wl, "QuotaReserved")
    if reserved is not None:  # Kueue's reason (Pending, Inadmissible) and message: what does not fit, or why
        return StartBlocker(QUEUED, f"{where} ({reserved.get('reason')}): {reserved.get('message') or ''}".rstrip(": "))
    return StartBlocker(QUEUED, f"{where}: waiting for the queue to consider it")
