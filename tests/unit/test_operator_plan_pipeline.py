"""MLPipeline planning, pure: RayJob states, triggers, history, gate outcomes, conditions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.operator.controller import conditions as c
from conveyor.operator.mlpipeline.build import ANNOTATION_RERUN, spec_hash
from conveyor.operator.mlpipeline.gate import GateResult
from conveyor.operator.mlpipeline.plan import (
    DeployTarget,
    GateOutcome,
    PipelinePlan,
    plan_pipeline,
    rayjob_state,
    runs_awaiting_gate,
)
from conveyor.runtime.spec import MLPipelineSpec

NOW = datetime(2026, 1, 5, 12, 0, 30, tzinfo=UTC)


def pipeline(status: dict[str, Any] | None = None, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body = {
        "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
        "registry": {"uri": "file:///r", "modelName": "fraud"},
    }
    body.update(spec)
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "MLPipeline",
        "metadata": {
            "name": "fraud",
            "namespace": "ml",
            "uid": "u",
            "generation": 2,
            "creationTimestamp": "2026-01-05T11:00:00Z",
            "annotations": annotations or {},
        },
        "spec": body,
        "status": status or {},
    }


def rayjob(run: int, deployment: str = "", job: str = "", failed: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": f"fraud-{run}", "namespace": "ml", "labels": {"conveyor.dev/run": str(run)}},
        "status": {"jobDeploymentStatus": deployment, "jobStatus": job, "failed": failed, **extra},
    }


def plan(obj: dict[str, Any], rayjobs: dict[int, dict[str, Any]] | None = None, **kw: Any) -> PipelinePlan:
    spec = MLPipelineSpec.model_validate(obj["spec"])
    return plan_pipeline(obj, spec, kw.pop("invalid", None), rayjobs or {}, kw.pop("gate", {}), kw.pop("now", NOW), **kw)


def settled(obj: dict[str, Any], p: PipelinePlan) -> dict[str, Any]:
    """The object as the next reconcile sees it: with the plan's status written."""
    return {**obj, "status": p.status}


def cond(p: PipelinePlan, type_: str) -> tuple[str, str]:
    x = c.get_condition(p.status["conditions"], type_)
    assert x is not None
    return x["status"], x["reason"]


# ---------------------------------------------------------------- RayJob state


@pytest.mark.parametrize(
    ("deployment", "job", "failed", "outcome", "reason", "attempts"),
    [
        ("", "", 0, "Pending", "Created", 1),
        ("Initializing", "", 0, "Pending", "Initializing", 1),
        ("Suspended", "", 0, "Pending", "Suspended", 1),  # queued by Kueue
        ("Running", "RUNNING", 0, "Running", "Running", 1),
        ("Running", "SUCCEEDED", 0, "Running", "Running", 1),  # KubeRay has not caught up yet
        ("Retrying", "FAILED", 1, "Running", "Retrying", 2),
        ("Complete", "SUCCEEDED", 0, "Succeeded", "Completed", 1),
        ("Complete", "SUCCEEDED", 1, "Succeeded", "Completed", 2),
        ("Complete", "FAILED", 0, "Failed", "JobFailed", 1),
        ("Complete", "STOPPED", 0, "Failed", "JobStopped", 1),
        ("Failed", "FAILED", 3, "Failed", "RayJobFailed", 3),
        ("Failed", "RUNNING", 1, "Failed", "DeadlineExceeded", 1),  # KubeRay issue 2314
        ("ValidationFailed", "", 0, "Failed", "ValidationFailed", 1),
    ],
)
def test_rayjob_state_reads_both_fields(deployment: str, job: str, failed: int, outcome: str, reason: str, attempts: int) -> None:
    extra = {"reason": "DeadlineExceeded"} if job == "RUNNING" and deployment == "Failed" else {}
    state = rayjob_state(rayjob(1, deployment, job, failed, **extra))
    assert (state.outcome, state.reason, state.attempts) == (outcome, reason, attempts)


def test_deadline_with_running_job_status_says_so() -> None:
    state = rayjob_state(rayjob(1, "Failed", "RUNNING", 1, reason="DeadlineExceeded", message="deadline passed"))
    assert "jobStatus RUNNING" in state.message and "deadline passed" in state.message


# ---------------------------------------------------------------- triggers


def test_first_sight_starts_run_1_and_sets_every_condition() -> None:
    p = plan(pipeline())
    assert (p.start_run, p.start_trigger) == (1, "Created")
    [run] = p.status["runs"]
    assert (run["run"], run["rayJob"], run["outcome"], run["specGeneration"]) == (1, "fraud-1", "Pending", 2)
    assert p.status["lastRun"] == 1 and p.status["activeRun"] == 1 and p.status["phase"] == "Pending"
    assert {x["type"] for x in p.status["conditions"]} == set(c.PIPELINE_CONDITIONS)
    assert cond(p, c.ACCEPTED) == ("True", "Valid")
    assert cond(p, c.SUCCEEDED) == ("Unknown", "RunInProgress")
    assert ("Normal", "RunStarted", "run 1 started (Created)") in p.events


def test_repeated_reconcile_is_a_no_op() -> None:
    first = plan(pipeline())
    obj = settled(pipeline(), first)
    again = plan(obj, {1: rayjob(1)}, now=NOW + timedelta(seconds=5))
    assert again.start_run is None and again.events == [] and again.status == first.status


def test_never_two_active_runs_changes_wait() -> None:
    obj = settled(pipeline(), plan(pipeline()))
    changed = {**obj, "spec": {**obj["spec"], "training": {"hyperparameters": {"epochs": 9}}}}
    changed["metadata"] = {**obj["metadata"], "annotations": {ANNOTATION_RERUN: "again"}}
    p = plan(changed, {1: rayjob(1, "Running", "RUNNING")})
    assert p.start_run is None and len(p.status["runs"]) == 1
    # The run ends: the waiting change starts run 2 in the same reconcile.
    done = plan(settled(changed, p), {1: rayjob(1, "Complete", "FAILED", message="boom")})
    assert (done.start_run, done.start_trigger) == (2, "SpecChanged")
    assert done.status["lastRerunToken"] == "again"  # consumed by run 2 as well


@pytest.mark.parametrize(
    ("change", "trigger"),
    [
        ({"spec": {"training": {"hyperparameters": {"epochs": 9}}}}, "SpecChanged"),
        ({"spec": {"evaluation": {"threshold": 0.5}}}, "SpecChanged"),
        ({"annotations": {ANNOTATION_RERUN: "2026-01-05"}}, "Rerun"),
        ({"spec": {"runsHistoryLimit": 9}}, None),
        ({"spec": {"deploy": {"modelDeployment": "x"}}}, None),
        ({"spec": {"suspend": False}}, None),
        ({}, None),
    ],
)
def test_what_starts_a_run_after_one_finished(change: dict[str, Any], trigger: str | None) -> None:
    first = plan(pipeline())
    finished = plan(settled(pipeline(), first), {1: rayjob(1, "Complete", "FAILED")})
    assert finished.start_run is None
    obj = settled(pipeline(), finished)
    obj = {**obj, "spec": {**obj["spec"], **change.get("spec", {})}}
    obj["metadata"] = {**obj["metadata"], "annotations": change.get("annotations", {})}
    p = plan(obj, {1: rayjob(1, "Complete", "FAILED")})
    assert p.start_trigger == trigger
    assert p.start_run == (2 if trigger else None)


def test_rerun_token_is_consumed_once() -> None:
    obj = pipeline(annotations={ANNOTATION_RERUN: "a"})
    first = plan(obj)
    assert first.status["lastRerunToken"] == "a"  # the creation run consumed it
    done = plan(settled(obj, first), {1: rayjob(1, "Complete", "FAILED")})
    assert done.start_run is None


def test_suspend_blocks_new_runs() -> None:
    p = plan(pipeline(suspend=True))
    assert p.start_run is None and p.status["phase"] == "Suspended"


def test_invalid_spec_is_a_false_condition_and_a_warning_once() -> None:
    obj = pipeline()
    spec = MLPipelineSpec.model_validate(obj["spec"])
    p = plan_pipeline(obj, spec, "metadata.name: too long", {}, {}, NOW)
    assert p.start_run is None
    assert cond(p, c.ACCEPTED) == ("False", "InvalidSpec")
    assert [e[1] for e in p.events] == ["InvalidSpec"]
    again = plan_pipeline(settled(obj, p), spec, "metadata.name: too long", {}, {}, NOW)
    assert again.events == [] and again.status == p.status  # no event storm, no status churn


# ---------------------------------------------------------------- schedule


def sched(now: datetime, status: dict[str, Any] | None = None, active: bool = False) -> PipelinePlan:
    obj = pipeline(status=status, triggers={"schedule": "*/10 * * * *"})
    rjs = {1: rayjob(1, "Running", "RUNNING")} if active else {1: rayjob(1, "Complete", "SUCCEEDED")}
    return plan(obj, rjs, now=now)


def done_status(**extra: Any) -> dict[str, Any]:
    obj = pipeline(triggers={"schedule": "*/10 * * * *"})
    status = plan(obj, now=datetime(2026, 1, 5, 11, 0, 5, tzinfo=UTC)).status
    status["runs"][0].update(outcome="Failed", reason="JobFailed", completionTime="2026-01-05T11:01:00Z")
    status.pop("activeRun")
    status.update(extra)
    return status


def test_schedule_fires_after_its_time_and_requeues_for_the_next() -> None:
    status = done_status(lastScheduleTime="2026-01-05T11:50:00Z")
    before = sched(datetime(2026, 1, 5, 11, 59, 0, tzinfo=UTC), status)
    assert before.start_run is None
    assert before.status["nextScheduleTime"] == "2026-01-05T12:00:00Z"
    assert before.requeue_after == pytest.approx(60.5)
    after = sched(datetime(2026, 1, 5, 12, 0, 1, tzinfo=UTC), status)
    assert (after.start_run, after.start_trigger) == (2, "Schedule")
    assert after.status["lastScheduleTime"] == "2026-01-05T12:00:00Z"
    assert after.status["nextScheduleTime"] == "2026-01-05T12:10:00Z"


def test_missed_firings_collapse_into_one_run() -> None:
    status = done_status(lastScheduleTime="2026-01-05T09:00:00Z")
    p = sched(datetime(2026, 1, 5, 12, 5, 0, tzinfo=UTC), status)
    assert p.start_run == 2 and p.status["lastScheduleTime"] == "2026-01-05T12:00:00Z"
    again = plan({**pipeline(triggers={"schedule": "*/10 * * * *"}), "status": p.status}, {1: rayjob(1, "Complete", "SUCCEEDED"), 2: rayjob(2)}, now=datetime(2026, 1, 5, 12, 6, tzinfo=UTC))
    assert again.start_run is None


def test_schedule_firing_during_a_run_is_skipped() -> None:
    status = plan(pipeline(triggers={"schedule": "*/10 * * * *"}), now=datetime(2026, 1, 5, 11, 55, tzinfo=UTC)).status
    p = sched(datetime(2026, 1, 5, 12, 0, 2, tzinfo=UTC), status, active=True)
    assert p.start_run is None and p.status["lastScheduleTime"] == "2026-01-05T12:00:00Z"
    assert [e[1] for e in p.events] == ["ScheduleSkipped"]


# ---------------------------------------------------------------- outcomes and gate


def passed(version: str = "v3", value: float = 0.93) -> GateOutcome:
    return GateOutcome(version, {"accuracy": value}, GateResult(True, "Passed", f"accuracy={value} reaches 0.9", "accuracy", value))


def test_success_waits_for_the_gate_then_records_version() -> None:
    obj = settled(pipeline(), plan(pipeline()))
    done = {1: rayjob(1, "Complete", "SUCCEEDED", endTime="2026-01-05T12:10:00Z")}
    assert runs_awaiting_gate(obj["status"], done) == [1]
    waiting = plan(obj, done)
    assert waiting.status["runs"][0]["outcome"] == "Running" and waiting.status["runs"][0]["reason"] == "ReadingModelPackage"
    p = plan(obj, done, gate={1: passed()}, deploy_target=DeployTarget("fraud", exists=True, follows=True))
    run = p.status["runs"][0]
    assert (run["outcome"], run["modelVersion"], run["metrics"], run["deployed"]) == ("Succeeded", "v3", {"accuracy": 0.93}, True)
    assert run["completionTime"] == "2026-01-05T12:10:00Z"
    assert p.status["latestVersion"] == "v3" and p.status["latestMetric"] == "accuracy=0.93"
    assert p.status["phase"] == "Succeeded" and "activeRun" not in p.status
    assert p.handed_over == "v3"
    for t in (c.DATA_VALIDATED, c.TRAINED, c.REGISTERED, c.EVALUATED, c.SUCCEEDED):
        assert cond(p, t)[0] == "True", t
    assert {e[1] for e in p.events} == {"RunSucceeded", "ModelHandedOver"}


def test_gate_failure_is_recorded_and_deploys_nothing() -> None:
    obj = settled(pipeline(), plan(pipeline()))
    verdict = GateResult(False, "BelowThreshold", "accuracy=0.5 is below the threshold 0.9", "accuracy", 0.5)
    p = plan(obj, {1: rayjob(1, "Complete", "SUCCEEDED")}, gate={1: GateOutcome("v4", {"accuracy": 0.5}, verdict)},
             deploy_target=DeployTarget("fraud", exists=True, follows=True))
    run = p.status["runs"][0]
    assert (run["outcome"], run["reason"], run["modelVersion"]) == ("GateFailed", "BelowThreshold", "v4")
    assert "latestVersion" not in p.status and p.handed_over is None
    assert cond(p, c.EVALUATED) == ("False", "BelowThreshold")
    assert cond(p, c.REGISTERED) == ("True", "Registered")
    assert cond(p, c.SUCCEEDED) == ("False", "GateFailed")
    assert p.status["phase"] == "Failed"
    assert p.reject_versions == {"v4": "BelowThreshold: accuracy=0.5 is below the threshold 0.9"}  # latest skips it


def test_success_without_a_package() -> None:
    obj = settled(pipeline(), plan(pipeline()))
    p = plan(obj, {1: rayjob(1, "Complete", "SUCCEEDED")}, gate={1: GateOutcome(None, {}, None)})
    assert p.status["runs"][0]["reason"] == "NoModelPackage"
    assert cond(p, c.REGISTERED) == ("False", "NoModelPackage")


VIOLATION_RECORD = {
    "outcome": "DataValidationFailed",
    "message": "data validation failed: 2 violation(s) in 3000 rows of builtin://fraud",
    "dataValidation": {
        "source": "builtin://fraud",
        "rows": 3000,
        "ok": False,
        "violations": [
            {"column": "amount", "rule": "max", "count": 12, "expected": "<= 500", "examples": [812.5]},
            {"column": "*", "rule": "minRows", "count": 1, "expected": ">= 5000 rows", "examples": []},
        ],
    },
}


def test_a_recorded_contract_violation_fails_the_run_without_a_retry() -> None:
    """The entrypoint exits 0 once it recorded the violation (no backoffLimit retry); the record fails the run."""
    obj = settled(pipeline(), plan(pipeline()))
    done = {1: rayjob(1, "Complete", "SUCCEEDED", endTime="2026-01-05T12:02:00Z")}
    # The gate is not consulted for a run whose record reports a violation: there is no package.
    assert runs_awaiting_gate(obj["status"], done, {1: VIOLATION_RECORD}) == []
    p = plan(obj, done, reports={1: VIOLATION_RECORD})
    run = p.status["runs"][0]
    assert (run["outcome"], run["reason"], run["attempts"]) == ("Failed", "DataContractViolated", 1)
    assert "column amount: max (12 value(s); expected <= 500)" in run["message"]
    assert "the dataset: minRows" in run["message"] and "3000 rows of builtin://fraud" in run["message"]
    status, reason = cond(p, c.DATA_VALIDATED)
    assert (status, reason) == ("False", "DataContractViolated")
    assert "column amount" in c.get_condition(p.status["conditions"], c.DATA_VALIDATED)["message"]
    assert cond(p, c.TRAINED) == ("False", "DataRejected")
    assert cond(p, c.SUCCEEDED) == ("False", "DataContractViolated")
    assert p.status["phase"] == "Failed" and p.start_run is None
    assert [e[:2] for e in p.events] == [("Warning", "DataContractViolated")]
    # Level-based: the next reconcile changes nothing and starts nothing.
    again = plan(settled(obj, p), done, reports={1: VIOLATION_RECORD})
    assert again.status == p.status and again.start_run is None and again.events == []


def test_a_violation_recorded_by_a_failed_job_is_still_a_contract_violation() -> None:
    obj = settled(pipeline(), plan(pipeline()))
    p = plan(obj, {1: rayjob(1, "Failed", "FAILED", message="exit code 2")}, reports={1: VIOLATION_RECORD})
    assert cond(p, c.DATA_VALIDATED) == ("False", "DataContractViolated")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (None, "exit code 1"),
        ({"outcome": "Failed", "message": "RuntimeError: CUDA out of memory"}, "RuntimeError: CUDA out of memory"),
    ],
)
def test_training_failure_conditions(record: dict[str, Any] | None, message: str) -> None:
    """A failed job is not a data verdict, whatever its log says; the record's message says why."""
    obj = settled(pipeline(), plan(pipeline()))
    reports = {1: record} if record else {}
    p = plan(obj, {1: rayjob(1, "Complete", "FAILED", message="exit code 1")}, reports=reports)
    run = p.status["runs"][0]
    assert (run["outcome"], run["reason"], run["message"]) == ("Failed", "JobFailed", message)
    assert cond(p, c.DATA_VALIDATED) == ("Unknown", "NotReported")
    assert cond(p, c.TRAINED) == ("False", "JobFailed")
    assert cond(p, c.SUCCEEDED) == ("False", "TrainingFailed")
    assert [e[:2] for e in p.events] == [("Warning", "RunFailed")]


def test_log_text_is_not_a_data_verdict() -> None:
    obj = settled(pipeline(), plan(pipeline()))
    p = plan(obj, {1: rayjob(1, "Complete", "FAILED", message="DataValidationError: column amount: 12 nulls")})
    assert cond(p, c.DATA_VALIDATED) == ("Unknown", "NotReported")


def test_retry_keeps_the_run_active_and_counts_attempts() -> None:
    obj = settled(pipeline(), plan(pipeline()))
    p = plan(obj, {1: rayjob(1, "Retrying", "FAILED", failed=1)})
    run = p.status["runs"][0]
    assert (run["outcome"], run["attempts"]) == ("Running", 2)
    assert p.start_run is None and [e[1] for e in p.events] == ["RunRetrying"]


def test_deleted_rayjob_fails_its_run() -> None:
    obj = settled(pipeline(), plan(pipeline()))
    p = plan(obj, {}, missing_rayjobs=frozenset({1}))
    assert p.status["runs"][0]["reason"] == "RayJobDeleted"
    # ...and merely not-yet-listed is not deleted.
    assert plan(obj, {}).status["runs"][0]["outcome"] == "Pending"


def test_orphan_rayjob_is_adopted_not_duplicated() -> None:
    """A RayJob created just before a crash, before the status recorded it."""
    p = plan(pipeline(), {1: rayjob(1, "Running", "RUNNING")})
    assert p.start_run is None
    assert p.status["lastRun"] == 1 and p.status["runs"][0]["rayJob"] == "fraud-1"


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (DeployTarget("web", exists=False, follows=False), "DeploymentNotFound"),
        (DeployTarget("web", exists=True, follows=False, pinned_version="v1"), "DeploymentPinned"),
    ],
)
def test_handover_refused(target: DeployTarget, reason: str) -> None:
    obj = settled(pipeline(), plan(pipeline()))
    p = plan(obj, {1: rayjob(1, "Complete", "SUCCEEDED")}, gate={1: passed()}, deploy_target=target)
    assert p.handed_over is None and p.status["runs"][0]["deployed"] is False
    assert ("Warning", reason) in [e[:2] for e in p.events]


# ---------------------------------------------------------------- history


def test_history_limit_prunes_runs_and_their_rayjobs() -> None:
    obj = pipeline(runsHistoryLimit=2)
    rjs: dict[int, dict[str, Any]] = {}
    status: dict[str, Any] = {}
    for n in range(1, 5):
        p = plan({**obj, "status": status}, rjs, now=NOW + timedelta(minutes=n))
        assert p.start_run == n
        rjs[n] = rayjob(n, "Complete", "FAILED")
        status = p.status
        obj = {**obj, "metadata": {**obj["metadata"], "annotations": {ANNOTATION_RERUN: str(n)}}}
    final = plan({**obj, "status": status}, rjs, now=NOW + timedelta(minutes=9))
    assert [r["run"] for r in final.status["runs"]] == [3, 4, 5]  # two finished + the new active one
    assert final.delete_rayjobs == ["fraud-1", "fraud-2"]


def test_spec_hash_ignores_non_training_fields() -> None:
    a = pipeline()["spec"]
    assert spec_hash(a) == spec_hash({**a, "suspend": True, "runsHistoryLimit": 2, "triggers": {"schedule": "@daily"}})
    assert spec_hash(a) != spec_hash({**a, "training": {"numWorkers": 2}})


def test_adopted_orphan_keeps_the_spec_it_was_built_from() -> None:
    """Crash between creating run 1 and recording it, while the user changed the spec: run 1 trains
    the old spec, so the new one still gets its own run once run 1 ends."""
    from conveyor.operator.mlpipeline.build import build_rayjob

    old = pipeline()
    orphan = build_rayjob(old, MLPipelineSpec.model_validate(old["spec"]), 1, "Created")
    new = pipeline(training={"hyperparameters": {"epochs": 30}})
    new["metadata"]["generation"] = 3
    adopted = plan(new, {1: orphan})
    assert adopted.start_run is None
    run = adopted.status["runs"][0]
    assert (run["trigger"], run["specGeneration"]) == ("Created", 2)
    assert adopted.status["lastSpecHash"] == spec_hash(old["spec"])
    orphan["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}
    after = plan(settled(new, adopted), {1: orphan})
    assert (after.start_run, after.start_trigger) == (2, "SpecChanged")
