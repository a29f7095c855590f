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
