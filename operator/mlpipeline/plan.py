"""MLPipeline reconcile logic, pure: (pipeline, its RayJobs, gate verdicts, now) -> (status, actions).

Runs. Run N of pipeline P is the RayJob `P-N` (labels conveyor.dev/pipeline, conveyor.dev/run). The
status records each run (`status.runs`, newest last) and the counters that make starting runs
idempotent: `lastRun`, `lastSpecHash` (the spec the last run trained), `lastRerunToken` (the value of
the `conveyor.dev/rerun` annotation the last run consumed) and `lastScheduleTime`.

A new run starts when no run is active, the spec is accepted, `spec.suspend` is false, and one of:
- no run ever started (trigger Created), or the training-relevant spec (everything but triggers,
  deploy, runsHistoryLimit and suspend) differs from the last run's (SpecChanged);
- the `conveyor.dev/rerun` annotation holds a value no run consumed yet (Rerun);
- the cron schedule (`spec.triggers.schedule`, UTC, via croniter) fired since the last scheduled run
  (Schedule). A firing while a run is active is skipped, as CronJob's `concurrencyPolicy: Forbid`;
  missed firings collapse into one;
- with `spec.triggers.onDrift`, a ModelDeployment whose `monitoring.retrainPipeline` names this pipeline
  is `Drifted=True` (Drift), once per drift episode (the condition's lastTransitionTime, recorded in
  `status.lastDriftEpisode` by whichever run starts during it) and no sooner than the deployment's
  `monitoring.retrainCooldown` after the last drift-started run (`status.lastDriftRunTime`). Level-based:
  a drift that arrives during a run is served when the run ends, if it still holds.
Spec changes and reruns that arrive during a run wait for it to end. Never two active runs.

Run state comes from both RayJob status fields, because they can disagree (KubeRay issue 2314:
`jobDeploymentStatus: Failed` with `jobStatus: RUNNING` after a deadline): a Failed/ValidationFailed
deployment status fails the run whatever jobStatus says; success needs `Complete` and `SUCCEEDED`;
`Retrying` keeps the run active and counts the attempt.

A run reports its outcome through the registry, not its log (a real RayJob's status carries only an
exit code): when its RayJob ends, the handler reads the run's outcome record. A record of a data-contract
violation fails the run (`DataValidated=False`, the violations in the message) even though the job
ended successfully: the training entrypoint exits 0 once it recorded the violation, because a
deterministic failure must not be retried by the RayJob's backoffLimit. Other failures fail the job, which
KubeRay retries; the record's message, when there is one, says why.

On success the handler reads the package the run registered (found by its lineage) and the gate
decides: a passing version becomes `status.latestVersion`, which the ModelDeployment in `spec.deploy`
follows (see modeldeployment/plan.py for the hand-off); a failing one is recorded (outcome GateFailed) and goes
nowhere. Finished runs beyond `runsHistoryLimit` leave the status, and their RayJobs are deleted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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
    runs_awaiting_report,
    schedule_due,
    start_run,
)
from conveyor.operator.controller.times import parse_time, rfc3339
from conveyor.operator.mlpipeline.blockers import BLOCKED_REASONS, QUEUED, StartBlocker
from conveyor.operator.mlpipeline.build import rayjob_name, spec_hash
from conveyor.operator.mlpipeline.gate import GateOutcome
from conveyor.runtime.spec import DeployedModel, MLPipelineSpec

GATE_FAILED = "GateFailed"

# The outcome a run records in the registry when its data broke the contract (runtime/training/run.py).
RECORD_DATA_VALIDATION_FAILED = "DataValidationFailed"
DATA_CONTRACT_VIOLATED = "DataContractViolated"


@dataclass(frozen=True)
class DeployTarget:
    """The ModelDeployment named in spec.deploy, as the handler found it."""

    name: str
    exists: bool
    follows: bool  # its spec.model.version is `latest` from this pipeline
    pinned_version: str | None = None
    serving: DeployedModel | None = None  # its stable version and package (what mustBeatDeployed must beat)


@dataclass(frozen=True)
class DriftSignal:
    """A ModelDeployment retraining through this pipeline reports drift (Drifted=True)."""

    deployment: str
    episode: str  # when its Drifted condition turned True
    message: str
    cooldown_seconds: float


@dataclass
class PipelinePlan:
    status: dict[str, Any]
    start_run: int | None = None
    start_trigger: str | None = None
    delete_rayjobs: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    handed_over: str | None = None  # version newly handed to spec.deploy
    reject_versions: dict[str, str] = field(default_factory=dict)  # version -> why: mark rejected in the registry


def runs_awaiting_gate(
    status: dict[str, Any], rayjobs: dict[int, dict[str, Any]], reports: dict[int, dict[str, Any]] | None = None
) -> list[int]:
    """Active runs whose RayJob succeeded and whose record reports no data violation: the handler must
    read their package before planning."""
    out = []
    for n in runs_awaiting_report(status, rayjobs):
        violated = ((reports or {}).get(n) or {}).get("outcome") == RECORD_DATA_VALIDATION_FAILED
        if rayjob_state(rayjobs[n]).outcome == SUCCEEDED and not violated:
            out.append(n)
    return out


def summarize_violations(report: dict[str, Any]) -> str:
    """One line per run record's data-validation report: which columns broke which rule, how often."""
    validation = report.get("dataValidation") or {}
    violations = validation.get("violations") or []
    head = f"data contract violated: {len(violations)} violation(s) in {validation.get('rows', '?')} rows of {validation.get('source', '?')}"
    parts = []
    for v in violations[:10]:
        column = v.get("column")
        where = "the dataset" if column in (None, "*") else f"column {column}"
        parts.append(f"{where}: {v.get('rule')} ({v.get('count')} value(s); expected {v.get('expected')})")
    more = f"; and {len(violations) - 10} more" if len(violations) > 10 else ""
    return head + (": " + "; ".join(parts) if parts else "") + more


def plan_pipeline(
    pipeline: dict[str, Any],
    spec: MLPipelineSpec | None,
    invalid: str | None,
    rayjobs: dict[int, dict[str, Any]],
    gate: dict[int, GateOutcome],
    now: datetime,
    *,
    missing_rayjobs: frozenset[int] = frozenset(),
    deploy_target: DeployTarget | None = None,
    reports: dict[int, dict[str, Any]] | None = None,
    drift: DriftSignal | None = None,
    blockers: dict[int, StartBlocker] | None = None,
) -> PipelinePlan:
    """Desired status and actions. `invalid` is the reason the spec cannot be used (None when fine).

    `rayjobs` maps run number -> RayJob of this pipeline; `missing_rayjobs` are runs whose RayJob was
    confirmed gone (deleted by someone) with a live read; `reports` maps run number -> the outcome record
    the run wrote to the registry (runs whose RayJob ended and that wrote one); `blockers` maps run
    number -> why a pending run's pods are not up (blockers.py), for runs pending too long.
    """
    generation = pipeline["metadata"].get("generation")
    status: dict[str, Any] = json.loads(json.dumps(pipeline.get("status") or {}))  # the plan never mutates its input
    status["observedGeneration"] = generation
    ts = rfc3339(now)
    plan = PipelinePlan(status=status)
    conds: list[dict[str, Any]] = status.setdefault("conditions", [])
    c.ensure_conditions(conds, c.PIPELINE_CONDITIONS, generation=generation, now=ts)
    runs: list[dict[str, Any]] = status.setdefault("runs", [])
    for run in runs:
        if run.get("outcome") in ACTIVE:
            reason_before = run.get("reason")
            _follow_run(plan, pipeline, run, rayjobs, gate, missing_rayjobs, deploy_target, ts, (reports or {}).get(run["run"]))
            _explain_pending(plan, run, (blockers or {}).get(run["run"]), reason_before)
    if invalid is not None or spec is None:
        if c.set_condition(conds, c.ACCEPTED, c.FALSE, "InvalidSpec", invalid or "invalid spec", generation=generation, now=ts):
            plan.events.append(("Warning", "InvalidSpec", invalid or "invalid spec"))
    else:
        c.set_condition(conds, c.ACCEPTED, c.TRUE, "Valid", "The spec is valid.", generation=generation, now=ts)
        active = [r for r in runs if r.get("outcome") in ACTIVE]
        _plan_triggers(plan, pipeline, spec, active, rayjobs, now, drift if spec.triggers.on_drift else None)
    prune_history(plan, spec.runs_history_limit if spec is not None else None, rayjobs)
    _summarize(plan, spec, generation, ts)
    return plan


def _follow_run(
    plan: PipelinePlan,
    pipeline: dict[str, Any],
    run: dict[str, Any],
    rayjobs: dict[int, dict[str, Any]],
    gate: dict[int, GateOutcome],
    missing_rayjobs: frozenset[int],
    deploy_target: DeployTarget | None,
    ts: str,
    report: dict[str, Any] | None,
) -> None:
    """An active run: its RayJob's state and outcome record, then (once it succeeded) the gate's verdict."""
    n = run["run"]
    rj = rayjobs.get(n)
    if rj is None:
        if n in missing_rayjobs:
            finish(run, FAILED, "RayJobDeleted", f"RayJob {run.get('rayJob')} disappeared before it finished", ts)
            plan.events.append(("Warning", "RunFailed", f"run {n}: its RayJob was deleted"))
        return
    state = rayjob_state(rj)
    if state.attempts > int(run.get("attempts") or 1) and state.outcome in ACTIVE:
        plan.events.append(("Normal", "RunRetrying", f"run {n}: attempt {state.attempts} ({state.message or state.reason})"))
    run["attempts"] = state.attempts
    if state.outcome in ACTIVE:
        run["outcome"] = state.outcome
        run["reason"] = state.reason
        if state.message:
            run["message"] = state.message[:2000]
        return
    end = state.end or ts
    report = report or {}
    if report.get("outcome") == RECORD_DATA_VALIDATION_FAILED:
        message = summarize_violations(report)
        finish(run, FAILED, DATA_CONTRACT_VIOLATED, message, end)
        plan.events.append(("Warning", DATA_CONTRACT_VIOLATED, f"run {n}: {message[:1000]}"))
        return
    if state.outcome == FAILED:
        message = report.get("message") or state.message  # the record says why; a RayJob only gives an exit code
        finish(run, FAILED, state.reason, message, end)
        plan.events.append(("Warning", "RunFailed", f"run {n} failed: {state.reason}: {message[:300]}"))
        return
    outcome = gate.get(n)
    if outcome is None:
        run["outcome"] = RUNNING
        run["reason"] = "ReadingModelPackage"
        return
    _record_gate(plan, pipeline, run, outcome, deploy_target, end)


# A run waiting for its pods is looked at again this often, so a reason reaches its status in the minute.
PENDING_RECHECK = 15.0


def _explain_pending(plan: PipelinePlan, run: dict[str, Any], blocker: StartBlocker | None, reason_before: str | None) -> None:
    """A pending run: the reason its pods are not up, when the cluster gave one (a Warning event when it
    first shows); while KubeRay is still making the cluster, a recheck (pods refused make no RayJob change).
    A run Kueue holds is Queued, with Kueue's reason (a Normal event: waiting for quota is no fault); the
    recheck refreshes it (the Workload's changes make no RayJob change either, until admission)."""
    if run.get("outcome") != PENDING:
        return
    if blocker is not None:
        if reason_before != blocker.reason and blocker.reason == QUEUED:
            plan.events.append(("Normal", "RunQueued", f"run {run['run']}: {blocker.message[:500]}"))
        elif reason_before != blocker.reason:
            plan.events.append(("Warning", "RunCannotStart", f"run {run['run']}: {blocker.reason}: {blocker.message[:500]}"))
        run["reason"], run["message"] = blocker.reason, blocker.message[:2000]
    elif reason_before == QUEUED and run.get("reason") != QUEUED:
        plan.events.append(("Normal", "RunAdmitted", f"run {run['run']}: admitted by Kueue"))
        run["message"] = "admitted by Kueue"
    if run.get("reason") in ("Created", "New", "Initializing", "", QUEUED, *BLOCKED_REASONS):
        plan.requeue_after = min(plan.requeue_after or PENDING_RECHECK, PENDING_RECHECK)


def _record_gate(
    plan: PipelinePlan,
    pipeline: dict[str, Any],
    run: dict[str, Any],
    outcome: GateOutcome,
    deploy_target: DeployTarget | None,
    end: str,
) -> None:
    n = run["run"]
    if outcome.version is None:
        finish(run, GATE_FAILED, "NoModelPackage", "the run succeeded but no committed model package names it in its lineage", end)
        plan.events.append(("Warning", "GateFailed", f"run {n}: no model package found"))
        return
    run["modelVersion"] = outcome.version
    run["metrics"] = outcome.metrics
    result = outcome.result
    assert result is not None
    if not result.passed:
        finish(run, GATE_FAILED, result.reason, result.message, end)
        plan.events.append(("Warning", "GateFailed", f"run {n} ({outcome.version}): {result.message}"))
        plan.reject_versions[outcome.version] = f"{result.reason}: {result.message}"
        return
    finish(run, SUCCEEDED, "GatePassed", result.message, end)
    plan.status["latestVersion"] = outcome.version
    if result.value is not None:
        plan.status["latestMetric"] = f"{result.metric}={result.value:.4g}"
    plan.events.append(("Normal", "RunSucceeded", f"run {n} produced {outcome.version}: {result.message}"))
    if deploy_target is not None:
        run["deployed"] = deploy_target.exists and deploy_target.follows
        _hand_over(plan, pipeline["metadata"]["name"], outcome.version, deploy_target, deployed=run["deployed"])


def _hand_over(plan: PipelinePlan, pipeline: str, version: str, target: DeployTarget, *, deployed: bool) -> None:
    """Tell whether the version passed to spec.deploy's ModelDeployment, and if not, why."""
    if deployed:
        plan.handed_over = version
        plan.events.append(("Normal", "ModelHandedOver", f"{version} is the candidate of ModelDeployment {target.name}"))
    elif not target.exists:
        plan.events.append(
            ("Warning", "DeploymentNotFound", f"spec.deploy names ModelDeployment {target.name}, which does not exist")
        )
    else:
        plan.events.append(
            (
                "Warning",
                "DeploymentPinned",
                f"ModelDeployment {target.name} pins {target.pinned_version}; set its "
                f"spec.model.version to latest (and pipeline to {pipeline}) to follow this pipeline",
            )
        )


def _summarize(plan: PipelinePlan, spec: MLPipelineSpec | None, generation: int | None, ts: str) -> None:
    """activeRun, phase and the run conditions, from the newest run."""
    status = plan.status
    runs = status["runs"]
    active = [r for r in runs if r.get("outcome") in ACTIVE]
    if active:
        status["activeRun"] = active[-1]["run"]
    else:
        status.pop("activeRun", None)
    _set_run_conditions(status["conditions"], runs[-1] if runs else None, generation, ts)
    if active and active[-1].get("reason") == QUEUED:
        status["phase"] = QUEUED  # Pending, waiting for Kueue: the Trained condition carries Kueue's reason
    elif active:
        status["phase"] = RUNNING if active[-1].get("outcome") == RUNNING else PENDING
    elif spec is not None and spec.suspend:
        status["phase"] = "Suspended"
    elif runs:
        status["phase"] = SUCCEEDED if runs[-1].get("outcome") == SUCCEEDED else FAILED
    else:
        status["phase"] = PENDING


def _plan_triggers(
    plan: PipelinePlan,
    pipeline: dict[str, Any],
    spec: MLPipelineSpec,
    active: list[dict[str, Any]],
    rayjobs: dict[int, dict[str, Any]],
    now: datetime,
    drift: DriftSignal | None = None,
) -> None:
    """Whether a run starts now, and why (the module docstring lists the triggers)."""
    status = plan.status
    current_hash = spec_hash(pipeline.get("spec") or {})
    trigger, token = due_trigger(pipeline, status, current_hash)
    fired = schedule_due(plan, pipeline, spec.triggers.schedule, now)
    if fired is not None and trigger is None:
        trigger = "Schedule"
    if trigger is None and _drift_due(plan, drift, now):
        trigger = "Drift"
    if held(plan, fired, active=bool(active), suspended=spec.suspend, kind="pipeline"):
        return
    if trigger is not None:
        name = pipeline["metadata"]["name"]
        run = start_run(plan, pipeline, rayjobs, trigger, current_hash, token, fired, now, lambda n: rayjob_name(name, n))
        plan.events.append(("Normal", "RunStarted", f"run {run['run']} started ({run['trigger']})"))
        if drift is not None:  # whatever started it, this run trains on the drifted data: the episode is served
            status["lastDriftEpisode"] = drift.episode
        if drift is not None and status["runs"][-1]["trigger"] == "Drift":
            status["lastDriftRunTime"] = rfc3339(now)
            plan.events.append(("Normal", "DriftRetrain", f"ModelDeployment {drift.deployment}: {drift.message}"[:1000]))


def _drift_due(plan: PipelinePlan, drift: DriftSignal | None, now: datetime) -> bool:
    """A drift episode no run served yet, outside the cooldown (a requeue for its end otherwise)."""
    if drift is None or drift.episode == plan.status.get("lastDriftEpisode"):
        return False
    last = parse_time(plan.status.get("lastDriftRunTime"))
    if last is not None:
        wait = drift.cooldown_seconds - (now - last).total_seconds()
        if wait > 0:
            plan.requeue_after = min(plan.requeue_after or wait + 0.5, wait + 0.5)
            return False
    return True


def _set_run_conditions(conds: list[dict[str, Any]], run: dict[str, Any] | None, generation: int | None, ts: str) -> None:
    def put(type_: str, status: str, reason: str, message: str) -> None:
        c.set_condition(conds, type_, status, reason, message, generation=generation, now=ts)

    if run is None:
        for t in (c.DATA_VALIDATED, c.TRAINED, c.REGISTERED, c.EVALUATED, c.SUCCEEDED):
            put(t, c.UNKNOWN, "NoRunYet", "No run has started.")
        return
    n = run["run"]
    outcome = run.get("outcome")
    reason = run.get("reason") or ""
    message = run.get("message") or ""
    if outcome in ACTIVE and reason == QUEUED:
        for t in (c.DATA_VALIDATED, c.REGISTERED, c.EVALUATED, c.SUCCEEDED):
            put(t, c.UNKNOWN, "RunInProgress", f"Run {n} is queued.")
        put(c.TRAINED, c.UNKNOWN, QUEUED, f"Run {n} is queued: {message[:1000]}")
        return
    if outcome in ACTIVE and reason in BLOCKED_REASONS:
        for t in (c.DATA_VALIDATED, c.REGISTERED, c.EVALUATED, c.SUCCEEDED):
            put(t, c.UNKNOWN, "RunInProgress", f"Run {n} is waiting for its pods.")
        put(c.TRAINED, c.UNKNOWN, reason, f"Run {n} cannot start: {message[:1000]}")
        return
    if outcome in ACTIVE:
        for t in (c.DATA_VALIDATED, c.TRAINED, c.REGISTERED, c.EVALUATED):
            put(t, c.UNKNOWN, "RunInProgress", f"Run {n} is {outcome.lower()}.")
        put(c.SUCCEEDED, c.UNKNOWN, "RunInProgress", f"Run {n} is {outcome.lower()}.")
        return
    if outcome == FAILED and reason == DATA_CONTRACT_VIOLATED:
        put(c.DATA_VALIDATED, c.FALSE, DATA_CONTRACT_VIOLATED, message[:1000])
        put(c.TRAINED, c.FALSE, "DataRejected", f"Run {n} did not train: its data broke the contract.")
        put(c.REGISTERED, c.FALSE, "NotTrained", f"Run {n} registered no model.")
        put(c.EVALUATED, c.UNKNOWN, "NotTrained", f"Run {n} produced no model to evaluate.")
        put(c.SUCCEEDED, c.FALSE, DATA_CONTRACT_VIOLATED, f"Run {n} failed: its data broke the contract.")
        return
    if outcome == FAILED:
        put(c.DATA_VALIDATED, c.UNKNOWN, "NotReported", f"Run {n} failed before reporting on its data.")
        put(c.TRAINED, c.FALSE, reason or "TrainingFailed", f"Run {n}: {message[:1000]}")
        put(c.REGISTERED, c.FALSE, "NotTrained", f"Run {n} registered no model.")
        put(c.EVALUATED, c.UNKNOWN, "NotTrained", f"Run {n} produced no model to evaluate.")
        put(c.SUCCEEDED, c.FALSE, "TrainingFailed", f"Run {n} failed: {reason}.")
        return
    put(c.DATA_VALIDATED, c.TRUE, "ContractMet", f"Run {n}'s data met the contract.")
    put(c.TRAINED, c.TRUE, "Completed", f"Run {n}'s RayJob succeeded.")
    if reason == "NoModelPackage":
        put(c.REGISTERED, c.FALSE, "NoModelPackage", message)
        put(c.EVALUATED, c.UNKNOWN, "NoModelPackage", "Nothing to evaluate.")
        put(c.SUCCEEDED, c.FALSE, "NoModelPackage", f"Run {n} registered no model.")
        return
    version = run.get("modelVersion", "?")
    put(c.REGISTERED, c.TRUE, "Registered", f"Run {n} registered {version}.")
    if outcome == GATE_FAILED:
        put(c.EVALUATED, c.FALSE, reason or "GateFailed", message)
        put(c.SUCCEEDED, c.FALSE, "GateFailed", f"{version} did not pass the evaluation gate.")
        return
    put(c.EVALUATED, c.TRUE, "GatePassed", message)
    put(c.SUCCEEDED, c.TRUE, "GatePassed", f"Run {n} produced {version}, which passed the gate.")
