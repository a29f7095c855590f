"""BatchPrediction reconcile logic, pure: (object, its RayJobs, run records, the model, now) -> (status, actions).

Runs. Run N of BatchPrediction B is the RayJob `B-batch-N` (labels conveyor.dev/batchprediction,
conveyor.dev/run). A run starts when none is active, the spec is accepted, `spec.suspend` is false, the
model resolves, and one of: no run ever started (Created); the scoring-relevant spec (all but schedule,
runsHistoryLimit, suspend) changed since the last run (SpecChanged); the `conveyor.dev/rerun`
annotation holds a value no run consumed (Rerun); the cron `spec.schedule` fired since the last
scheduled run (Schedule; a firing while a run is active is skipped, missed firings collapse into one).

The model resolves when the run starts: a registry version as written (`latest` is resolved by the job,
which records the version it used); an MLPipeline's `status.latestVersion` from its `spec.registry`; a
ModelDeployment's `status.stableVersion` from its `spec.model`. One that does not resolve yet (no
version passed the gate, nothing serves) keeps the run from starting: `ModelResolved=False`, and the
object is looked at again shortly.

A run reports through storage, not logs: when its RayJob ends, the handler reads the record the job wrote
(`<output>/_runs/run-<N>.json`) and the run takes its figures from it (rows scored and rejected, the
output folder, the duration, the input's drift, the version that scored). A RayJob that succeeded
without a record failed (NoOutcomeRecord); a failed one takes the record's message when there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.operator.batchprediction.build import ResolvedModel, rayjob_name, spec_hash
from conveyor.operator.controller import conditions as c
from conveyor.operator.controller.events import Event
from conveyor.operator.controller.runs import (
    ACTIVE,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    due_trigger,
    finish,
    held,
    prune_history,
    rayjob_state,
    schedule_due,
    start_run,
)
from conveyor.operator.controller.times import rfc3339
from conveyor.runtime.spec import BatchPredictionSpec

MODEL_RESOLVED = "ModelResolved"
BATCH_CONDITIONS = (c.ACCEPTED, MODEL_RESOLVED, c.SUCCEEDED)
# How soon a BatchPrediction waiting for its model is looked at again.
MODEL_RETRY_SECONDS = 30.0
RECORD_FIELDS = ("rowsScored", "rowsRejected", "output", "durationSeconds", "drift", "modelVersion")


@dataclass(frozen=True)
class ModelResolution:
    """The model the handler resolved, or why it could not."""

    model: ResolvedModel | None
    problem: str = ""


@dataclass
class BatchPlan:
    status: dict[str, Any]
    start_run: int | None = None
    start_trigger: str | None = None
    model: ResolvedModel | None = None
    delete_rayjobs: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


def plan_batch(
    bp: dict[str, Any],
    spec: BatchPredictionSpec | None,
    invalid: str | None,
    rayjobs: dict[int, dict[str, Any]],
    now: datetime,
    *,
    model: ModelResolution,
    reports: dict[int, dict[str, Any]] | None = None,
    missing_rayjobs: frozenset[int] = frozenset(),
) -> BatchPlan:
    """Desired status and actions; `reports` maps run number -> the record of a run whose RayJob ended."""
    generation = bp["metadata"].get("generation")
    status: dict[str, Any] = json.loads(json.dumps(bp.get("status") or {}))  # never mutate the input
    status["observedGeneration"] = generation
    ts = rfc3339(now)
    plan = BatchPlan(status=status)
    conds: list[dict[str, Any]] = status.setdefault("conditions", [])
    c.ensure_conditions(conds, BATCH_CONDITIONS, generation=generation, now=ts)
    runs: list[dict[str, Any]] = status.setdefault("runs", [])
    for run in runs:
        if run.get("outcome") in ACTIVE:
            _follow_run(plan, run, rayjobs, missing_rayjobs, (reports or {}).get(run["run"]), ts)
    if invalid is not None or spec is None:
        if c.set_condition(conds, c.ACCEPTED, c.FALSE, "InvalidSpec", invalid or "invalid spec", generation=generation, now=ts):
            plan.events.append(("Warning", "InvalidSpec", invalid or "invalid spec"))
    else:
        c.set_condition(conds, c.ACCEPTED, c.TRUE, "Valid", "The spec is valid.", generation=generation, now=ts)
        _plan_triggers(plan, bp, spec, rayjobs, model, now)
    prune_history(plan, spec.runs_history_limit if spec is not None else None, rayjobs)
    _summarize(plan, spec, generation, ts)
    return plan


def _follow_run(
    plan: BatchPlan,
    run: dict[str, Any],
    rayjobs: dict[int, dict[str, Any]],
    missing: frozenset[int],
    report: dict[str, Any] | None,
    ts: str,
) -> None:
    n = run["run"]
    rj = rayjobs.get(n)
    if rj is None:
        if n in missing:
            finish(run, FAILED, "RayJobDeleted", f"RayJob {run.get('rayJob')} disappeared before it finished", ts)
            plan.events.append(("Warning", "RunFailed", f"run {n}: its RayJob was deleted"))
        return
    state = rayjob_state(rj)
    run["attempts"] = state.attempts
    if state.outcome in ACTIVE:
        run["outcome"], run["reason"] = state.outcome, state.reason
        if state.message:
            run["message"] = state.message[:2000]
        return
    end = state.end or ts
    report = report or {}
    for key in RECORD_FIELDS:
        if report.get(key) is not None:
            run[key] = report[key]
    if state.outcome == FAILED or report.get("outcome") == "Failed":
        message = report.get("message") or state.message
        finish(run, FAILED, state.reason if state.outcome == FAILED else "ScoringFailed", message, end)
        plan.events.append(("Warning", "RunFailed", f"run {n} failed: {message[:300]}"))
        return
    if report.get("outcome") != "Succeeded":
        finish(run, FAILED, "NoOutcomeRecord", "the job ended without writing its outcome record", end)
        plan.events.append(("Warning", "RunFailed", f"run {n}: the job wrote no outcome record"))
        return
    rejected = int(report.get("rowsRejected") or 0)
    reasons = "; ".join(f"{r['rows']} x {r['reason']}" for r in report.get("rejectReasons") or [])
    message = f"{report.get('rowsScored', 0)} rows scored, {rejected} rejected" + (f" ({reasons})" if reasons else "")
    finish(run, SUCCEEDED, "Completed", message, end)
    plan.status["lastOutput"] = report.get("output")
    plan.events.append(("Normal", "RunSucceeded", f"run {n}: {message[:900]}"))
    if rejected:
        plan.events.append(("Warning", "RowsRejected", f"run {n}: {rejected} rows failed the input schema ({reasons[:700]})"))


def _plan_triggers(
    plan: BatchPlan,
    bp: dict[str, Any],
    spec: BatchPredictionSpec,
    rayjobs: dict[int, dict[str, Any]],
    model: ModelResolution,
    now: datetime,
) -> None:
    status = plan.status
    generation = bp["metadata"].get("generation")
    ts = rfc3339(now)
    current_hash = spec_hash(bp.get("spec") or {})
    trigger, token = due_trigger(bp, status, current_hash)
    fired = schedule_due(plan, bp, spec.schedule, now)
    if fired is not None and trigger is None:
        trigger = "Schedule"
    if model.model is None:
        changed = c.set_condition(status["conditions"], MODEL_RESOLVED, c.FALSE, "ModelUnavailable", model.problem, generation=generation, now=ts)
        if changed:
            plan.events.append(("Warning", "ModelUnavailable", model.problem[:1000]))
    else:
        c.set_condition(status["conditions"], MODEL_RESOLVED, c.TRUE, "Resolved", f"Runs score with {model.model.describe()}.", generation=generation, now=ts)
    active = any(r.get("outcome") in ACTIVE for r in status["runs"])
    if held(plan, fired, active=active, suspended=spec.suspend, kind="BatchPrediction") or trigger is None:
        return
    if model.model is None:  # the trigger stays due: looked at again shortly
        plan.requeue_after = min(plan.requeue_after or MODEL_RETRY_SECONDS, MODEL_RETRY_SECONDS)
        return
    name = bp["metadata"]["name"]
    run = start_run(plan, bp, rayjobs, trigger, current_hash, token, fired, now, lambda n: rayjob_name(name, n),
                    modelVersion=model.model.version)
    if plan.start_run == run["run"]:
        plan.model = model.model
    plan.events.append(("Normal", "RunStarted", f"run {run['run']} started ({run['trigger']}) with {model.model.describe()}"))


def _summarize(plan: BatchPlan, spec: BatchPredictionSpec | None, generation: int | None, ts: str) -> None:
    status = plan.status
    runs = status["runs"]
    active = [r for r in runs if r.get("outcome") in ACTIVE]
    if active:
        status["activeRun"] = active[-1]["run"]
        status["phase"] = RUNNING if active[-1].get("outcome") == RUNNING else PENDING
    else:
        status.pop("activeRun", None)
        if spec is not None and spec.suspend:
            status["phase"] = "Suspended"
        elif runs:
            status["phase"] = SUCCEEDED if runs[-1].get("outcome") == SUCCEEDED else FAILED
        else:
            status["phase"] = PENDING
    last = runs[-1] if runs else None
    conds = status["conditions"]
    if last is None:
        c.set_condition(conds, c.SUCCEEDED, c.UNKNOWN, "NoRunYet", "No run has started.", generation=generation, now=ts)
    elif last.get("outcome") in ACTIVE:
        c.set_condition(conds, c.SUCCEEDED, c.UNKNOWN, "RunInProgress", f"Run {last['run']} is {last['outcome'].lower()}.", generation=generation, now=ts)
    elif last.get("outcome") == SUCCEEDED:
        c.set_condition(conds, c.SUCCEEDED, c.TRUE, "Completed", f"Run {last['run']}: {last.get('message', '')}"[:1000], generation=generation, now=ts)
    else:
        c.set_condition(conds, c.SUCCEEDED, c.FALSE, last.get("reason") or "RunFailed", f"Run {last['run']}: {last.get('message', '')}"[:1000], generation=generation, now=ts)
