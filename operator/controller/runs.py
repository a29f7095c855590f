"""Runs, as MLPipeline and BatchPrediction keep them: run N of object O is one RayJob, recorded in
`status.runs` (newest last) with the counters that make starting runs idempotent (`lastRun`,
`lastSpecHash`, `lastRerunToken`, `lastScheduleTime`). The pure pieces both kinds' planners share:
a RayJob's state, which trigger is due, starting a run (adopting a RayJob a crash left behind), and
pruning the history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from conveyor.operator.controller.events import Event
from conveyor.operator.controller.schedule import cron_firing
from conveyor.operator.controller.times import parse_time, rfc3339

PENDING = "Pending"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
ACTIVE = (PENDING, RUNNING)

LABEL_RUN = "conveyor.dev/run"
# What a run was started from, on its RayJob, so a RayJob adopted after a crash (before the object's
# status recorded it) tells which spec and which rerun request it already serves.
ANNOTATION_SPEC_HASH = "conveyor.dev/spec-hash"
ANNOTATION_SPEC_GENERATION = "conveyor.dev/spec-generation"
ANNOTATION_TRIGGER = "conveyor.dev/trigger"
ANNOTATION_RERUN = "conveyor.dev/rerun"


class RunPlan(Protocol):
    """What a kind's plan holds that run bookkeeping writes to."""

    status: dict[str, Any]
    start_run: int | None
    start_trigger: str | None
    delete_rayjobs: list[str]
    events: list[Event]
    requeue_after: float | None


@dataclass(frozen=True)
class RayJobState:
    outcome: str  # Pending, Running, Succeeded, Failed
    reason: str
    message: str
    attempts: int
    start: str | None
    end: str | None


def rayjob_state(rayjob: dict[str, Any]) -> RayJobState:
    st = rayjob.get("status") or {}
    deployment = st.get("jobDeploymentStatus") or ""
    job = st.get("jobStatus") or ""
    failed = int(st.get("failed") or 0)
    message = st.get("message") or ""
    start, end = st.get("startTime"), st.get("endTime")
    if deployment in ("Failed", "ValidationFailed"):
        reason = st.get("reason") or ("ValidationFailed" if deployment == "ValidationFailed" else "RayJobFailed")
        if job and job not in ("FAILED", "STOPPED", "SUCCEEDED"):
            message = (message + " " if message else "") + f"(KubeRay reports jobStatus {job} too)"
        return RayJobState(FAILED, reason, message or f"RayJob {deployment}", max(failed, 1), start, end)
    if deployment == "Complete":
        if job == "SUCCEEDED":
            return RayJobState(SUCCEEDED, "Completed", message, failed + 1, start, end)
        reason = {"FAILED": "JobFailed", "STOPPED": "JobStopped"}.get(job, "JobNotSucceeded")
        return RayJobState(FAILED, reason, message or f"Ray job ended {job or 'without a status'}", max(failed, 1), start, end)
    if deployment in ("Running", "Retrying"):
        return RayJobState(RUNNING, deployment, message, failed + 1, start, end)
    # New, Initializing, Waiting, Suspending, Suspended (e.g. queued by Kueue).
    return RayJobState(PENDING, deployment or "Created", message, failed + 1, start, end)


def runs_awaiting_report(status: dict[str, Any], rayjobs: dict[int, dict[str, Any]]) -> list[int]:
    """Active runs whose RayJob ended: the handler reads their outcome record before planning."""
    out = []
    for run in status.get("runs") or []:
        rj = rayjobs.get(run["run"])
        if run.get("outcome") in ACTIVE and rj is not None and rayjob_state(rj).outcome not in ACTIVE:
            out.append(run["run"])
    return out


def finish(run: dict[str, Any], outcome: str, reason: str, message: str, end: str) -> None:
    run["outcome"] = outcome
    run["reason"] = reason
    run["message"] = message[:2000]
    run["completionTime"] = end


def due_trigger(obj: dict[str, Any], status: dict[str, Any], current_hash: str) -> tuple[str | None, str | None]:
    """(trigger, rerun token): Created (no run yet), SpecChanged (the run-relevant spec differs from the
    last run's), Rerun (the rerun annotation holds a value no run consumed), else None."""
    token = (obj["metadata"].get("annotations") or {}).get(ANNOTATION_RERUN)
    if not status.get("lastSpecHash"):
        return "Created", token
    if status["lastSpecHash"] != current_hash:
        return "SpecChanged", token
    if token and token != status.get("lastRerunToken"):
        return "Rerun", token
    return None, token


def held(plan: RunPlan, fired: datetime | None, *, active: bool, suspended: bool, kind: str) -> bool:
    """No run may start (one is active, or the object is suspended): a schedule firing now is recorded as
    served and skipped, as CronJob's `concurrencyPolicy: Forbid`. True when held."""
    if not (active or suspended):
        return False
    if fired is not None:
        plan.status["lastScheduleTime"] = rfc3339(fired)
        why = "a run is active" if active else f"the {kind} is suspended"
        plan.events.append(("Normal", "ScheduleSkipped", f"the schedule fired at {rfc3339(fired)} while {why}"))
    return True


def start_run(
    plan: RunPlan,
    obj: dict[str, Any],
    rayjobs: dict[int, dict[str, Any]],
    trigger: str,
    current_hash: str,
    token: str | None,
    fired: datetime | None,
    now: datetime,
    rayjob_name: Callable[[int], str],
    **entry: Any,
) -> dict[str, Any]:
    """Record a new run (with `entry`'s extra fields) and ask for its RayJob, or adopt the RayJob newer
    than the status knows of that a crash or restart left behind: never a second one. Returns the run."""
    status = plan.status
    meta = obj["metadata"]
    last_run = int(status.get("lastRun") or 0)
    known = {r["run"] for r in status["runs"]}
    orphans = sorted(n for n in rayjobs if n > last_run and n not in known)
    n = orphans[0] if orphans else last_run + 1
    generation = meta.get("generation")
    if orphans:
        # The orphan serves the spec and rerun request it was created from, not necessarily today's.
        made_from = rayjobs[n]["metadata"].get("annotations") or {}
        current_hash = made_from.get(ANNOTATION_SPEC_HASH, current_hash)
        token = made_from.get(ANNOTATION_RERUN, status.get("lastRerunToken"))
        trigger = made_from.get(ANNOTATION_TRIGGER, trigger)
        generation = int(made_from.get(ANNOTATION_SPEC_GENERATION) or generation or 0) or generation
    status["lastRun"] = n
    status["lastSpecHash"] = current_hash
    if token:
        status["lastRerunToken"] = token
    if fired is not None:
        status["lastScheduleTime"] = rfc3339(fired)
    run = {
        "run": n,
        "rayJob": rayjob_name(n),
        "trigger": trigger,
        "specGeneration": generation,
        **entry,
        "startTime": rfc3339(now),
        "outcome": PENDING,
        "reason": "Created",
        "message": "",
        "attempts": 1,
    }
    status["runs"].append(run)
    if n not in rayjobs:
        plan.start_run = n
        plan.start_trigger = trigger
    return run


def prune_history(plan: RunPlan, history_limit: int | None, rayjobs: dict[int, dict[str, Any]]) -> None:
    """Keep active runs and the newest `history_limit` finished ones (all when None: the spec is unusable);
    delete the RayJobs of the rest."""
    status = plan.status
    runs = status["runs"]
    limit = history_limit if history_limit is not None else max(len(runs), 1)
    finished = [r for r in runs if r.get("outcome") not in ACTIVE]
    keep_finished = {r["run"] for r in finished[-limit:]} if limit > 0 else set()
    status["runs"] = [r for r in runs if r.get("outcome") in ACTIVE or r["run"] in keep_finished]
    kept = {r["run"] for r in status["runs"]}
    last_run = int(status.get("lastRun") or 0)
    for n, rj in sorted(rayjobs.items()):
        if n not in kept and n <= last_run and n != plan.start_run and not rj["metadata"].get("deletionTimestamp"):
            plan.delete_rayjobs.append(rj["metadata"]["name"])


def schedule_due(plan: RunPlan, obj: dict[str, Any], schedule: str | None, now: datetime) -> datetime | None:
    """The firing of `schedule` not yet served (since status.lastScheduleTime, or the object's creation),
    if any; sets status.nextScheduleTime and the plan's requeue for the next firing."""
    status = plan.status
    base = parse_time(status.get("lastScheduleTime")) or parse_time(obj["metadata"].get("creationTimestamp")) or now
    fired, next_fire = cron_firing(schedule, base, now)
    if next_fire is None:
        status.pop("nextScheduleTime", None)
        return None
    status["nextScheduleTime"] = rfc3339(next_fire)
    plan.requeue_after = max(1.0, (next_fire - now).total_seconds() + 0.5)
    return fired


def rayjobs_by_run(rayjobs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for rj in rayjobs:
        try:
            out[int((rj["metadata"].get("labels") or {})[LABEL_RUN])] = rj
        except (KeyError, ValueError):
            continue
    return out

