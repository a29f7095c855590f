"""The rollout state machine, transition by transition (table-driven): each row is a state, what the
cluster shows, an analysis, and the state and actions a person would see follow."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.operator.modeldeployment.rollout import (
    ANALYSIS_ERRORS,
    INCONCLUSIVE,
    PAUSED,
    PAUSED_BY_USER,
    PROGRESSING,
    ROLLED_BACK,
    ROLLING_BACK,
    STABLE,
    Analysed,
    Analysis,
    CheckResult,
    Emit,
    Finished,
    Policy,
    Rejected,
    RolloutState,
    Seen,
    Unrejected,
    next_step,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
KNATIVE = Policy(steps=(10, 50, 100), interval=MIN, failure_limit=1, inconclusive_limit=2, error_limit=2)
STANDARD = replace(KNATIVE, mode="Standard")

SETTLED = RolloutState(phase=STABLE, stable="v1")
# v2 at the first step, held since a minute ago: an analysis is due now.
DUE = RolloutState(phase=PROGRESSING, stable="v1", canary="v2", step=0, weight=10,
                   step_start=NOW - MIN, next_analysis=NOW)
LAST = replace(DUE, step=2, weight=100)
SUCCESS = CheckResult("successRate", "Failed", 0.62, 1.0, ">= 0.99", "success rate 0.62 < 0.99")
PASS = Analysis("Passed", (CheckResult("successRate", "Passed", 1.0, 1.0, ">= 0.99"),))
FAIL = Analysis("Failed", (SUCCESS,))
INCONC = Analysis("Inconclusive", (CheckResult("requests", "Inconclusive", 3, 50, ">= 10", "3 requests < 10"),))
ERROR = Analysis("Error", message="Prometheus unreachable")

ROWS: list[tuple[str, RolloutState, dict[str, Any], Analysis | None, Policy, dict[str, Any], list[str]]] = [
    # id, state, seen, analysis, policy, expected state fields, expected action kinds/reasons
    ("first version is served", RolloutState(), {"wanted": "v1"}, None, KNATIVE,
     {"phase": STABLE, "stable": "v1", "canary": None}, ["VersionDeployed"]),
    ("same version: nothing", SETTLED, {"wanted": "v1"}, None, KNATIVE, {"phase": STABLE, "canary": None}, []),
    ("new version starts a canary at the first step", SETTLED, {"wanted": "v2"}, None, KNATIVE,
     {"phase": PROGRESSING, "canary": "v2", "weight": 10, "step": 0, "step_start": None}, ["CanaryStarted"]),
    ("immediate replaces in place", SETTLED, {"wanted": "v2"}, None, replace(KNATIVE, strategy="immediate"),
     {"phase": STABLE, "stable": "v2", "canary": None}, ["VersionReplaced"]),
    ("a rejected version is not retried", replace(SETTLED, phase=ROLLED_BACK), {"wanted": "v2", "rejected": {"v2"}},
     None, KNATIVE, {"phase": ROLLED_BACK, "canary": None}, []),
    ("retry takes a rejected version again", replace(SETTLED, phase=ROLLED_BACK),
     {"wanted": "v2", "rejected": {"v2"}, "action": "retry"}, None, KNATIVE,
     {"phase": PROGRESSING, "canary": "v2", "weight": 10}, ["Unrejected", "RolloutRetried", "CanaryStarted"]),
    ("a newer version after a rollback starts fresh", replace(SETTLED, phase=ROLLED_BACK),
     {"wanted": "v3", "rejected": {"v2"}}, None, KNATIVE, {"phase": PROGRESSING, "canary": "v3"}, ["CanaryStarted"]),
    ("hold waits for KServe to report the weight", replace(DUE, step_start=None, next_analysis=None),
     {"wanted": "v2", "reported_weight": 0}, None, KNATIVE, {"step_start": None, "next_analysis": None}, []),
    ("hold starts when KServe reports the weight", replace(DUE, step_start=None, next_analysis=None),
     {"wanted": "v2", "reported_weight": 10}, None, KNATIVE, {"step_start": NOW, "next_analysis": NOW + MIN}, []),
    ("not due: no analysis taken", replace(DUE, next_analysis=NOW + timedelta(seconds=5)),
     {"wanted": "v2", "reported_weight": 10}, PASS, KNATIVE, {"weight": 10, "step": 0}, []),
    ("pass steps up", DUE, {"wanted": "v2", "reported_weight": 10}, PASS, KNATIVE,
     {"phase": PROGRESSING, "step": 1, "weight": 50, "step_start": None}, ["Analysed", "CanaryStepped"]),
    ("pass at the last step promotes", LAST, {"wanted": "v2", "reported_weight": 100}, PASS, KNATIVE,
     {"phase": STABLE, "stable": "v2", "canary": None, "weight": 0}, ["Analysed", "Promoted", "Finished:Promoted"]),
    ("a failure within the limit waits an interval", DUE, {"wanted": "v2", "reported_weight": 10}, FAIL, KNATIVE,
     {"phase": PROGRESSING, "failures": 1, "next_analysis": NOW + MIN}, ["Analysed", "AnalysisFailed"]),
    ("a failure past the limit rolls back (Knative: 0% first)", replace(DUE, failures=1),
     {"wanted": "v2", "reported_weight": 10}, FAIL, KNATIVE, {"phase": ROLLING_BACK, "canary": "v2", "weight": 0},
     ["Analysed", "AnalysisFailed", "Rejected:successRate", "Finished:RolledBack", "RolledBack"]),
    ("Knative rollback ends once KServe reports 0%", replace(DUE, phase=ROLLING_BACK, weight=0),
     {"wanted": "v2", "reported_weight": 0, "rejected": {"v2"}}, None, KNATIVE,
     {"phase": ROLLED_BACK, "stable": "v1", "canary": None}, ["RollbackComplete"]),
    ("Knative rollback waits while KServe reports the old split", replace(DUE, phase=ROLLING_BACK, weight=0),
     {"wanted": "v2", "reported_weight": 10, "rejected": {"v2"}}, None, KNATIVE, {"phase": ROLLING_BACK}, []),
    ("Standard rollback drops the canary at once", replace(DUE, failures=1), {"wanted": "v2", "reported_weight": 10},
     FAIL, STANDARD, {"phase": ROLLED_BACK, "canary": None, "stable": "v1"},
     ["Analysed", "AnalysisFailed", "Rejected:successRate", "Finished:RolledBack", "RolledBack"]),
    ("inconclusive waits", DUE, {"wanted": "v2", "reported_weight": 10}, INCONC, KNATIVE,
     {"phase": PROGRESSING, "inconclusive": 1, "failures": 0, "next_analysis": NOW + MIN},
     ["Analysed", "AnalysisInconclusive"]),
    ("inconclusive past the limit pauses", replace(DUE, inconclusive=2), {"wanted": "v2", "reported_weight": 10},
     INCONC, KNATIVE, {"phase": PAUSED, "pause_reason": INCONCLUSIVE, "weight": 10},
     ["Analysed", "AnalysisInconclusive", "RolloutPaused"]),
    ("an error is retried soon, never a pass", DUE, {"wanted": "v2", "reported_weight": 10}, ERROR, KNATIVE,
     {"phase": PROGRESSING, "errors": 1, "step": 0, "next_analysis": NOW + timedelta(seconds=10)},
     ["Analysed", "AnalysisError"]),
    ("errors past the limit pause", replace(DUE, errors=2), {"wanted": "v2", "reported_weight": 10}, ERROR, KNATIVE,
     {"phase": PAUSED, "pause_reason": ANALYSIS_ERRORS, "step": 0}, ["Analysed", "AnalysisError", "RolloutPaused"]),
    ("a pass clears the error count", replace(DUE, errors=2), {"wanted": "v2", "reported_weight": 10}, PASS, KNATIVE,
     {"errors": 0, "step": 1}, ["Analysed", "CanaryStepped"]),
    ("spec.rollout.paused holds and takes no analysis", DUE, {"wanted": "v2", "reported_weight": 10, "paused": True},
     PASS, KNATIVE, {"phase": PAUSED, "pause_reason": PAUSED_BY_USER, "weight": 10, "step": 0}, ["RolloutPaused"]),
    ("still paused: nothing new", replace(DUE, phase=PAUSED, pause_reason=PAUSED_BY_USER),
     {"wanted": "v2", "paused": True}, None, KNATIVE, {"phase": PAUSED}, []),
    ("unpausing resumes and restarts the hold", replace(DUE, phase=PAUSED, pause_reason=PAUSED_BY_USER),
     {"wanted": "v2", "reported_weight": 10}, None, KNATIVE,
     {"phase": PROGRESSING, "step_start": NOW, "next_analysis": NOW + MIN}, ["RolloutResumed"]),
    ("a machine pause waits for a person", replace(DUE, phase=PAUSED, pause_reason=ANALYSIS_ERRORS, errors=3),
     {"wanted": "v2", "reported_weight": 10}, None, KNATIVE, {"phase": PAUSED, "errors": 3}, []),
    ("resume leaves a machine pause with counters reset",
     replace(DUE, phase=PAUSED, pause_reason=ANALYSIS_ERRORS, errors=3),
     {"wanted": "v2", "reported_weight": 10, "action": "resume"}, None, KNATIVE,
     {"phase": PROGRESSING, "errors": 0, "pause_reason": None}, ["RolloutResumed"]),
    ("retry of a paused rollout resumes it", replace(DUE, phase=PAUSED, pause_reason=INCONCLUSIVE, inconclusive=3),
     {"wanted": "v2", "action": "retry"}, None, KNATIVE, {"phase": PROGRESSING, "inconclusive": 0}, ["RolloutResumed"]),
    ("promote by hand skips to 100%", DUE, {"wanted": "v2", "action": "promote"}, None, KNATIVE,
     {"phase": STABLE, "stable": "v2", "canary": None}, ["Promoted", "Finished:Promoted"]),
    ("promote by hand works while paused", replace(DUE, phase=PAUSED, pause_reason=INCONCLUSIVE),
     {"wanted": "v2", "action": "promote"}, None, KNATIVE, {"phase": STABLE, "stable": "v2"},
     ["Promoted", "Finished:Promoted"]),
    ("abort rolls back now", DUE, {"wanted": "v2", "action": "abort"}, None, STANDARD,
     {"phase": ROLLED_BACK, "stable": "v1", "canary": None},
     ["Rejected:Aborted", "Finished:Aborted", "RolledBack"]),
    ("a Git revert drops the canary", DUE, {"wanted": "v1"}, None, KNATIVE,
     {"phase": STABLE, "stable": "v1", "canary": None}, ["CanaryDropped"]),
    ("a newer version mid-rollout restarts with it", replace(DUE, step=1, weight=50, failures=1), {"wanted": "v3"},
     None, KNATIVE, {"phase": PROGRESSING, "canary": "v3", "step": 0, "weight": 10, "failures": 0},
     ["CanaryReplaced", "CanaryStarted"]),
]


def _kinds(actions: list[Any]) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Emit):
            out.append(a.reason)
        elif isinstance(a, Finished):
            out.append(f"Finished:{a.outcome}")
        elif isinstance(a, Rejected):
            out.append(f"Rejected:{a.check}")
        else:
            out.append(type(a).__name__)
    return out


@pytest.mark.parametrize(("state", "seen", "analysis", "policy", "expected", "actions"),
                         [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_transition(state: RolloutState, seen: dict[str, Any], analysis: Analysis | None, policy: Policy,
                    expected: dict[str, Any], actions: list[str]) -> None:
    seen_ = Seen(**{**seen, "rejected": frozenset(seen.get("rejected", ()))})
    new, acts = next_step(state, analysis, NOW, policy=policy, seen=seen_)
    assert {k: getattr(new, k) for k in expected} == expected
    assert _kinds(acts) == actions


def test_every_outcome_is_a_fixed_point() -> None:
    """Level-based: the state a transition leads to, fed back with what the cluster then shows (the
    rejection recorded, the action consumed), yields itself and no actions: a repeated reconcile is a no-op."""
    for name, state, seen, analysis, policy, _, _ in ROWS:
        seen_ = Seen(**{**seen, "rejected": frozenset(seen.get("rejected", ()))})
        new, acts = next_step(state, analysis, NOW, policy=policy, seen=seen_)
        rejected = (seen_.rejected | {a.version for a in acts if isinstance(a, Rejected)}) - {
            a.version for a in acts if isinstance(a, Unrejected)
        }
        again, more = next_step(new, None, NOW, policy=policy, seen=replace(seen_, rejected=rejected, action=None))
        assert (again, more) == (new, []), name


def test_rollback_records_the_failing_check_and_value() -> None:
    _, acts = next_step(replace(DUE, failures=1), FAIL, NOW, policy=STANDARD, seen=Seen(wanted="v2", reported_weight=10))
    rejected = next(a for a in acts if isinstance(a, Rejected))
    assert (rejected.version, rejected.check, rejected.value) == ("v2", "successRate", 0.62)
    warning = next(a for a in acts if isinstance(a, Emit) and a.reason == "RolledBack")
    assert warning.type == "Warning" and "success rate 0.62 < 0.99" in warning.message
    assert any(isinstance(a, Analysed) and a.analysis is FAIL for a in acts)


def test_whole_rollout_promotes_after_every_step() -> None:
    """A good version, step by step: hold, analyse, step up, and promote after the last; no step skipped."""
    state, now, weights = SETTLED, NOW, []
    state, _ = next_step(state, None, now, policy=KNATIVE, seen=Seen(wanted="v2"))
    while state.canary is not None:
        seen = Seen(wanted="v2", reported_weight=state.weight)
        state, _ = next_step(state, None, now, policy=KNATIVE, seen=seen)  # the hold starts
        weights.append(state.weight)
        now += MIN
        state, acts = next_step(state, PASS, now, policy=KNATIVE, seen=seen)
    assert weights == [10, 50, 100] and state.stable == "v2" and Finished("Promoted") in acts
    assert not any(isinstance(a, Unrejected) for a in acts)
