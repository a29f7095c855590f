"""Why a run does not start, from the cluster's own words (blockers.py), and how the plan shows it."""

from __future__ import annotations

from typing import Any

import pytest
from test_operator_plan_pipeline import cond, pipeline, plan, rayjob, settled

from conveyor.operator.controller import conditions as c
from conveyor.operator.mlpipeline.blockers import (
    IMAGE_PULL_FAILED,
    PODS_FORBIDDEN,
    QUEUED,
    QUOTA_EXCEEDED,
    UNSCHEDULABLE,
    StartBlocker,
    queue_blocker,
    start_blocker,
)
from conveyor.operator.mlpipeline.plan import PENDING_RECHECK

FORBIDDEN = ('pods "fraud-1-head-x" is forbidden: violates PodSecurity "restricted:latest": '
             'allowPrivilegeEscalation != false (container "ray-head" must set securityContext.allowPrivilegeEscalation=false)')


def event(kind: str, name: str, reason: str, message: str, type_: str = "Warning") -> dict[str, Any]:
    return {"type": type_, "reason": reason, "message": message, "involvedObject": {"kind": kind, "name": name}}


CASES = [
    ("KubeRay's ReplicaFailure condition",
     {"status": {"conditions": [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreateHeadPod", "message": FORBIDDEN}]}},
     [], PODS_FORBIDDEN, "violates PodSecurity"),
    ("the submitter Job's FailedCreate event", None,
     [event("Job", "fraud-1", "FailedCreate", FORBIDDEN)], PODS_FORBIDDEN, "Job fraud-1"),
    ("a ResourceQuota's refusal", None,
     [event("RayCluster", "fraud-1-abc", "FailedToCreateWorkerPod",
            'pods "w" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, used: 4, limited: 4')],
     QUOTA_EXCEEDED, "exceeded quota"),
    ("the scheduler's verdict", None,
     [event("Pod", "fraud-1-abc-gpu-worker-x", "FailedScheduling", "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")],
     UNSCHEDULABLE, "Insufficient nvidia.com/gpu"),
    ("a kubelet's pull failure", None,
     [event("Pod", "fraud-1-abc-head-x", "Failed", 'Failed to pull image "ghcr.io/x:1": not found'),
      event("Pod", "fraud-1-abc-head-x", "Failed", "Error: ErrImagePull")],
     IMAGE_PULL_FAILED, "ghcr.io/x:1"),
]


@pytest.mark.parametrize(("what", "raycluster", "events", "reason", "says"), CASES, ids=[c[0] for c in CASES])
def test_the_blocker_names_what_the_cluster_said(what: str, raycluster: Any, events: list[Any], reason: str, says: str) -> None:
    found = start_blocker(raycluster, events)
    assert found is not None and found.reason == reason and says in found.message


def test_nothing_in_the_way_is_no_blocker() -> None:
    normal = event("RayCluster", "fraud-1-abc", "CreatedHeadPod", "Created head Pod", type_="Normal")
    assert start_blocker({"status": {"conditions": []}}, [normal]) is None


def _pending_run() -> dict[str, Any]:
    return {"runs": [{"run": 1, "rayJob": "fraud-1", "trigger": "Created", "startTime": "2026-01-05T11:59:00Z",
                      "outcome": "Pending", "reason": "Initializing", "message": "", "attempts": 1}],
            "lastRun": 1}


def test_a_blocked_run_says_why_in_its_status_and_one_warning() -> None:
    blocker = StartBlocker(PODS_FORBIDDEN, f"RayCluster fraud-1-abc (FailedToCreateHeadPod): {FORBIDDEN}")
    obj = pipeline(status=_pending_run())
    rjs = {1: rayjob(1, "Initializing")}
    p = plan(obj, rjs, blockers={1: blocker})
    run = p.status["runs"][-1]
    assert (run["outcome"], run["reason"]) == ("Pending", PODS_FORBIDDEN) and "violates PodSecurity" in run["message"]
    assert cond(p, c.TRAINED) == (c.UNKNOWN, PODS_FORBIDDEN)
    assert [e for e in p.events if e[0] == "Warning"] == [("Warning", "RunCannotStart", f"run 1: {PODS_FORBIDDEN}: {blocker.message}")]
    again = plan(settled(obj, p), rjs, blockers={1: blocker})
    assert not [e for e in again.events if e[0] == "Warning"]  # one event per blocker, not per reconcile
    assert again.requeue_after is not None and again.requeue_after <= PENDING_RECHECK


def test_a_pending_run_is_rechecked_until_its_pods_are_up() -> None:
    obj = pipeline(status=_pending_run())
    assert plan(obj, {1: rayjob(1, "Initializing")}).requeue_after == PENDING_RECHECK
    started = plan(obj, {1: rayjob(1, "Running", "RUNNING")})
    assert started.status["runs"][-1]["outcome"] == "Running"
    assert started.requeue_after is None or started.requeue_after > PENDING_RECHECK


# ---------------------------------------------------------------- Kueue


def workload(*conditions: tuple[str, str, str, str]) -> dict[str, Any]:
    return {"status": {"conditions": [{"type": t, "status": st, "reason": r, "message": m} for t, st, r, m in conditions]}}


NO_ROOM = ("couldn't assign flavors to pod set head: insufficient unused quota for cpu in flavor default-flavor, "
           "1500m more needed")
QUEUE_CASES = [
    ("no Workload yet", [], "no Workload yet"),
    ("no room in the ClusterQueue", [workload(("QuotaReserved", "False", "Pending", NO_ROOM))], f"(Pending): {NO_ROOM}"),
    ("no such LocalQueue", [workload(("QuotaReserved", "False", "Inadmissible", "LocalQueue gpu doesn't exist"))],
     "(Inadmissible): LocalQueue gpu doesn't exist"),
    ("evicted", [workload(("QuotaReserved", "False", "Pending", ""), ("Evicted", "True", "Preempted", "Preempted by a higher priority"))],
     "evicted (Preempted): Preempted by a higher priority"),
    ("admission checks pending", [workload(("QuotaReserved", "True", "QuotaReserved", ""), ("Admitted", "False", "", ""))],
     "waiting for its admission checks"),
]


@pytest.mark.parametrize(("what", "workloads", "says"), QUEUE_CASES, ids=[c[0] for c in QUEUE_CASES])
def test_a_held_run_is_queued_with_kueues_reason(what: str, workloads: list[Any], says: str) -> None:
    found = queue_blocker("team", workloads)
    assert found is not None and found.reason == QUEUED
    assert found.message.startswith("Kueue holds it in LocalQueue team") and says in found.message


def test_an_admitted_or_finished_workload_is_no_longer_queued() -> None:
    assert queue_blocker("team", [workload(("QuotaReserved", "True", "", ""), ("Admitted", "True", "Admitted", ""))]) is None
    assert queue_blocker("team", [workload(("Finished", "True", "Succeeded", ""))]) is None


def test_a_queued_run_shows_queued_with_kueues_reason_then_starts_when_admitted() -> None:
    blocker = queue_blocker("team", [workload(("QuotaReserved", "False", "Pending", NO_ROOM))])
    assert blocker is not None
    obj = pipeline(status=_pending_run())
    suspended = {1: rayjob(1, "Suspended")}
    p = plan(obj, suspended, blockers={1: blocker})
    run = p.status["runs"][-1]
    assert (run["outcome"], run["reason"]) == ("Pending", QUEUED) and NO_ROOM in run["message"]
    assert p.status["phase"] == QUEUED
    trained = c.get_condition(p.status["conditions"], c.TRAINED)
    assert trained is not None and (trained["status"], trained["reason"]) == (c.UNKNOWN, QUEUED)
    assert "(Pending)" in trained["message"] and "insufficient unused quota" in trained["message"]
    # A wait, not a fault: one Normal event, no Warning; rechecked while it waits.
    assert [e[:2] for e in p.events] == [("Normal", "RunQueued")] and NO_ROOM in p.events[0][2]
    assert p.requeue_after is not None and p.requeue_after <= PENDING_RECHECK
    again = plan(settled(obj, p), suspended, blockers={1: blocker})
    assert again.events == [] and again.status["phase"] == QUEUED
    # Kueue admits it (unsuspends the RayJob): KubeRay makes its cluster; the run is no longer queued.
    admitted = plan(settled(obj, again), {1: rayjob(1, "Initializing")})
    run = admitted.status["runs"][-1]
    assert (run["outcome"], run["reason"], admitted.status["phase"]) == ("Pending", "Initializing", "Pending")
    assert run["message"] == "admitted by Kueue" and [e[:2] for e in admitted.events] == [("Normal", "RunAdmitted")]
    assert cond(admitted, c.TRAINED) == (c.UNKNOWN, "RunInProgress")
