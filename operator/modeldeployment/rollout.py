"""The rollout of a ModelDeployment as a pure state machine: `next_step(state, analysis, now) -> (state, actions)`.

Semantics follow Argo Rollouts and Flagger:
- A new version (not the stable one, not rejected) starts a canary at `steps[0]`; `strategy: immediate`
  replaces the stable version in place (KServe only moves traffic to it once it is Ready: Knative routes
  to a revision once it is ready, a Deployment's rolling update keeps old pods until new ones are).
- Each step's hold begins when KServe reports the step's weight (the InferenceService's status, not our
  spec). After `interval` the step is analysed (analysis.py): Passed steps up, or promotes after the
  last step; Failed counts toward `failureLimit` (the number of failed analyses tolerated: one more
  rolls back); Inconclusive (fewer than `minRequests` requests in the window) waits another interval,
  and past `inconclusiveLimit` pauses for a person; Error (Prometheus unreachable, a query error, NaN
  where a number is needed) is never a pass: retried after `min(interval, 10s)`, and past
  `consecutiveErrorLimit` consecutive errors the rollout pauses, because a rollout that cannot see its
  metrics must neither promote blindly nor roll back a healthy version on a monitoring outage.
- Rollback: Standard mode drops the canary entry at once; Knative first sets `canaryTrafficPercent: 0`
  (phase RollingBack) and, once KServe reports the candidate at 0%, restores the stable version's spec
  (as KServe's canary documentation prescribes). The version is recorded as rejected: a deployment that
  follows `latest` never retries it automatically; a newer version starts a fresh rollout.
- Shadow (`strategy: shadow`): the candidate first runs beside the stable version with no traffic of
  its own while the stable predictor mirrors `shadow.percent` of its requests to it (runtime/serving/
  shadow.py); state `shadow`, weight 0, status `rolloutStage: Shadow`. Its hold begins once the mirror
  is in place (the operator reports weight 0 then); its analysis reads the mirror's counters (requests
  mirrored, the shadow's success rate, latency, agreement with the stable answers, analysis.py). Passed:
  the canary steps begin (`shadow.then: canary`) or the candidate is promoted (`then: promote`); a
  rollback only removes the shadow (callers never saw it), in both modes at once.
- Manual control: `paused` (spec.rollout.paused) holds the weight and stops analysis; the one-shot
  actions promote (skip to 100%), abort (roll back now), resume (leave a pause the machine took) and
  retry (a rejected version again, or a paused rollout with its counters reset).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from conveyor.operator.controller.times import parse_time, rfc3339
from conveyor.runtime.spec import DEFAULT_KSERVE_MODE, ModelDeploymentSpec

STABLE = "Stable"
PROGRESSING = "Progressing"
PAUSED = "Paused"
ROLLING_BACK = "RollingBack"
ROLLED_BACK = "RolledBack"

# Pause reasons (status.pauseReason)
PAUSED_BY_USER = "PausedByUser"
INCONCLUSIVE = "InconclusiveAnalysis"
ANALYSIS_ERRORS = "AnalysisErrors"

SHADOW_STAGE = "Shadow"  # status.rolloutStage while the candidate only receives mirrored requests

ACTIONS = ("promote", "abort", "resume", "retry")
ERROR_RETRY = timedelta(seconds=10)

Verdict = Literal["Passed", "Failed", "Inconclusive", "Error"]


@dataclass(frozen=True)
class CheckResult:
    """One check of one analysis: the candidate's value beside the stable version's, and the verdict."""

    name: str
    verdict: Verdict
    candidate: float | None = None
    stable: float | None = None
    threshold: str = ""  # for people, e.g. ">= 0.99", "<= 250ms"
    message: str = ""


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    checks: tuple[CheckResult, ...] = ()
    message: str = ""

    def culprit(self) -> CheckResult | None:
        """The check that decided a non-passing verdict (the first one with that verdict)."""
        return next((c for c in self.checks if c.verdict == self.verdict), None)


@dataclass(frozen=True)
class Policy:
    strategy: str = "canary"
    steps: tuple[int, ...] = (10, 50, 100)
    interval: timedelta = timedelta(minutes=1)
    failure_limit: int = 1
    inconclusive_limit: int = 3
    error_limit: int = 4
    mode: str = "Knative"
    shadow_then: str = "canary"  # strategy shadow: canary | promote after a passed analysis


@dataclass(frozen=True)
class Seen:
    """What the cluster shows this reconcile, besides the analysis."""

    wanted: str | None = None  # the version the spec asks for (resolved)
    rejected: frozenset[str] = frozenset()
    reported_weight: int | None = None  # the canary's share KServe reports; None: not reported
    paused: bool = False  # spec.rollout.paused
    action: str | None = None  # a one-shot action not yet consumed (ACTIONS)


@dataclass(frozen=True)
class RolloutState:
    phase: str = STABLE
    stable: str | None = None
    canary: str | None = None
    step: int = 0
    weight: int = 0
    step_start: datetime | None = None  # the hold began (KServe reported the step's weight)
    next_analysis: datetime | None = None
    failures: int = 0
    inconclusive: int = 0  # at this step
    errors: int = 0  # consecutive
    pause_reason: str | None = None
    pause_message: str | None = None
    shadow: bool = False  # the candidate receives mirrored requests only (strategy shadow)

    def analysis_due(self, now: datetime) -> bool:
        return self.phase == PROGRESSING and self.next_analysis is not None and now >= self.next_analysis


@dataclass(frozen=True)
class Emit:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Finished:
    outcome: str  # Promoted | RolledBack | Aborted


@dataclass(frozen=True)
class Rejected:
    version: str
    check: str
    value: float | None
    message: str


@dataclass(frozen=True)
class Unrejected:
    version: str


@dataclass(frozen=True)
class Analysed:
    analysis: Analysis


Action = Emit | Finished | Rejected | Unrejected | Analysed


@dataclass
class _Step:
    state: RolloutState
    actions: list[Action] = field(default_factory=list)

    def emit(self, type_: str, reason: str, message: str) -> None:
        self.actions.append(Emit(type_, reason, message))


def next_step(
    state: RolloutState, analysis: Analysis | None, now: datetime, *, policy: Policy, seen: Seen
) -> tuple[RolloutState, list[Action]]:
    """The rollout's next state and what to do about it (events, metrics, records). Pure and level-based:
    the same inputs give the same state, and a state with nothing to do returns itself and no actions."""
    s = _Step(state)
    if state.canary is None:
        _settled(s, policy, seen)
    elif _switches(state, seen):
        _wanted_changed(s, policy, seen)
    elif seen.action == "abort" and state.phase != ROLLING_BACK:
        _roll_back(s, policy, "Aborted", None, f"{state.canary} aborted by hand", outcome="Aborted")
    elif seen.action == "promote" and state.phase != ROLLING_BACK:
        s.emit("Normal", "Promoted", f"{state.canary} promoted by hand at {state.weight}%; it serves all traffic")
        _promote(s)
    elif state.phase == ROLLING_BACK:
        if seen.reported_weight == 0 or policy.mode != "Knative":
            s.emit("Normal", "RollbackComplete", f"KServe reports {state.canary} at 0%; {state.stable}'s spec restored")
            s.state = replace(_cleared(state), phase=ROLLED_BACK)
    elif seen.paused:
        if not (state.phase == PAUSED and state.pause_reason == PAUSED_BY_USER):
            s.emit("Normal", "RolloutPaused", f"{state.canary} held at {state.weight}% (spec.rollout.paused)")
        s.state = _paused(state, PAUSED_BY_USER, "spec.rollout.paused is true")
    elif state.phase == PAUSED:
        if state.pause_reason == PAUSED_BY_USER or seen.action in ("resume", "retry"):
            s.emit("Normal", "RolloutResumed", f"{state.canary} resumes at {state.weight}%")
            s.state = replace(state, phase=PROGRESSING, pause_reason=None, pause_message=None, step_start=None,
                              next_analysis=None, inconclusive=0, errors=0)
            _hold(s, policy, seen, now)
    else:
        _hold(s, policy, seen, now)
        if s.state.analysis_due(now) and analysis is not None:
            _judge(s, policy, analysis, now)
    return s.state, s.actions


def _switches(state: RolloutState, seen: Seen) -> bool:
    """Mid-rollout, the spec asks for a version other than the canary (a rejected one only by hand)."""
    wanted = seen.wanted
    if wanted is None or wanted == state.canary or state.phase == ROLLING_BACK:
        return False
    return wanted == state.stable or wanted not in seen.rejected or seen.action == "retry"


def _cleared(state: RolloutState) -> RolloutState:
    return replace(state, canary=None, step=0, weight=0, step_start=None, next_analysis=None, failures=0,
                   inconclusive=0, errors=0, pause_reason=None, pause_message=None, shadow=False)


def _paused(state: RolloutState, reason: str, message: str) -> RolloutState:
    return replace(state, phase=PAUSED, pause_reason=reason, pause_message=message, next_analysis=None)


def _settled(s: _Step, policy: Policy, seen: Seen) -> None:
    """No canary: take in a new wanted version (first deploy, immediate swap, or a fresh canary)."""
    state, wanted = s.state, seen.wanted
    if wanted is None or wanted == state.stable:
        return
    if state.stable is None:
        s.emit("Normal", "VersionDeployed", f"serving {wanted}")
        s.state = replace(state, stable=wanted, phase=STABLE)
        return
    if wanted in seen.rejected:
        if seen.action != "retry":
            return  # never retried automatically: a person asks (retry), or a newer version comes
        s.actions.append(Unrejected(wanted))
        s.emit("Normal", "RolloutRetried", f"{wanted} was rolled back before; retried by hand")
    _start(s, policy, wanted)


def _start(s: _Step, policy: Policy, version: str) -> None:
    stable = s.state.stable
    if policy.strategy == "immediate":
        s.emit("Normal", "VersionReplaced", f"{version} replaces {stable} (immediate)")
        s.state = replace(_cleared(s.state), stable=version, phase=STABLE)
        return
    if policy.strategy == "shadow":
        s.emit("Normal", "ShadowStarted", f"{version} receives a mirrored share of {stable}'s requests; "
                                          f"its answers are discarded ({policy.mode} mode)")
        s.state = replace(_cleared(s.state), canary=version, weight=0, shadow=True, phase=PROGRESSING)
        return
    weight = policy.steps[0]
    s.emit("Normal", "CanaryStarted", f"{version} takes {weight}% beside {stable} ({policy.mode} mode)")
    s.state = replace(_cleared(s.state), canary=version, weight=weight, phase=PROGRESSING)


def _wanted_changed(s: _Step, policy: Policy, seen: Seen) -> None:
    """The spec asks for another version mid-rollout: back to the stable one (a Git revert) drops the
    canary; a newer one restarts the rollout with it (as Flagger does)."""
    state, wanted = s.state, seen.wanted
    assert wanted is not None
    if wanted == state.stable:
        s.emit("Normal", "CanaryDropped", f"{state.canary} dropped: the wanted version is {state.stable} again")
        s.state = replace(_cleared(state), phase=STABLE)
    else:
        if wanted in seen.rejected:
            s.actions.append(Unrejected(wanted))
        s.emit("Normal", "CanaryReplaced", f"{state.canary} is no longer wanted; {wanted} starts a fresh rollout")
        _start(s, policy, wanted)


def _promote(s: _Step) -> None:
    s.actions.append(Finished("Promoted"))
    s.state = replace(_cleared(s.state), stable=s.state.canary, phase=STABLE)


def _roll_back(s: _Step, policy: Policy, check: str, value: float | None, message: str, *, outcome: str) -> None:
    state = s.state
    assert state.canary is not None
    s.actions += [Rejected(state.canary, check, value, message), Finished(outcome)]
    s.emit("Warning", "RolledBack", f"{state.canary} rolled back, {state.stable} serves all traffic: {message}")
    if policy.mode == "Knative" and not state.shadow:
        # Knative: the candidate's revision to 0% first; its spec gives way once KServe reports 0%.
        s.state = replace(state, phase=ROLLING_BACK, weight=0, step_start=None, next_analysis=None)
    else:
        s.state = replace(_cleared(state), phase=ROLLED_BACK)


def _hold(s: _Step, policy: Policy, seen: Seen, now: datetime) -> None:
    """Start the step's hold once KServe reports the step's weight."""
    state = s.state
    if state.step_start is None and seen.reported_weight == state.weight:
        s.state = replace(state, step_start=now, next_analysis=now + policy.interval)


def _judge(s: _Step, policy: Policy, analysis: Analysis, now: datetime) -> None:
    state = s.state
    s.actions.append(Analysed(analysis))
    culprit = analysis.culprit()
    detail = analysis.message or (culprit.message if culprit else "")
    if analysis.verdict == "Passed":
        s.state = replace(state, errors=0)
        if state.shadow and policy.shadow_then != "promote":
            weight = policy.steps[0]
            s.emit("Normal", "ShadowPassed", f"{state.canary} passed analysis in shadow; now a canary at {weight}%")
            s.state = replace(s.state, shadow=False, step=0, weight=weight, step_start=None, next_analysis=None,
                              inconclusive=0, failures=0)
        elif state.shadow:
            s.emit("Normal", "Promoted", f"{state.canary} passed analysis in shadow; it serves all traffic")
            _promote(s)
        elif state.step + 1 >= len(policy.steps):
            s.emit("Normal", "Promoted", f"{state.canary} passed every step; it serves all traffic")
            _promote(s)
        else:
            weight = policy.steps[state.step + 1]
            s.emit("Normal", "CanaryStepped", f"{state.canary} passed analysis at {state.weight}%; now {weight}%")
            s.state = replace(s.state, step=state.step + 1, weight=weight, step_start=None, next_analysis=None,
                              inconclusive=0)
    elif analysis.verdict == "Failed":
        failures = state.failures + 1
        s.state = replace(state, failures=failures, errors=0, next_analysis=now + policy.interval)
        s.emit("Warning", "AnalysisFailed", f"{state.canary} at {state.weight}%: {detail} "
                                            f"({failures} failed, {policy.failure_limit} tolerated)")
        if failures > policy.failure_limit:
            name = culprit.name if culprit else "analysis"
            _roll_back(s, policy, name, culprit.candidate if culprit else None, detail, outcome="RolledBack")
    elif analysis.verdict == "Inconclusive":
        count = state.inconclusive + 1
        s.state = replace(state, inconclusive=count, errors=0, next_analysis=now + policy.interval)
        s.emit("Normal", "AnalysisInconclusive", f"{state.canary} at {state.weight}%: {detail}")
        if count > policy.inconclusive_limit:
            message = f"{count} inconclusive analyses at {state.weight}% ({detail}); resume, promote or abort"
            s.emit("Warning", "RolloutPaused", message)
            s.state = _paused(s.state, INCONCLUSIVE, message)
    else:
        count = state.errors + 1
        s.state = replace(state, errors=count, next_analysis=now + min(policy.interval, ERROR_RETRY))
        s.emit("Warning", "AnalysisError", f"{state.canary} at {state.weight}%: {detail}")
        if count > policy.error_limit:
            message = f"{count} analyses in a row could not be made ({detail}); resume once metrics are back"
            s.emit("Warning", "RolloutPaused", message)
            s.state = _paused(s.state, ANALYSIS_ERRORS, message)


# ---------------------------------------------------------------- the state in status, the policy from the spec

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """A Go/PromQL-style duration such as 30s, 2m or 1h30m (the CRD's pattern admits only those)."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return timedelta(seconds=sum(int(n) * _UNIT[u] for n, u in parts))


def policy_for(spec: ModelDeploymentSpec) -> Policy:
    r = spec.rollout
    return Policy(
        strategy=r.strategy,
        steps=tuple(r.steps),
        interval=parse_duration(r.interval),
        failure_limit=r.analysis.failure_limit,
        inconclusive_limit=r.analysis.inconclusive_limit,
        error_limit=r.analysis.consecutive_error_limit,
        mode=r.mode or DEFAULT_KSERVE_MODE,
        shadow_then=r.shadow.then,
    )


# status field <- state attribute, for the fields that exist only while a canary runs
_CANARY_FIELDS = {
    "canaryVersion": "canary", "canaryWeight": "weight", "rolloutStep": "step", "failedAnalyses": "failures",
    "inconclusiveAnalyses": "inconclusive", "analysisErrors": "errors", "pauseReason": "pause_reason",
    "pauseMessage": "pause_message",
}
_TIME_FIELDS = {"stepStartTime": "step_start", "nextAnalysisTime": "next_analysis"}


def state_from_status(status: dict[str, Any]) -> RolloutState:
    canary = status.get("canaryVersion")
    values: dict[str, Any] = {attr: status.get(key) for key, attr in _CANARY_FIELDS.items()}
    for key in ("weight", "step", "failures", "inconclusive", "errors"):
        values[key] = int(values[key] or 0)
    values.update({attr: parse_time(status.get(key)) for key, attr in _TIME_FIELDS.items()})
    phase = status.get("rolloutPhase") or (PROGRESSING if canary else STABLE)
    shadow = bool(canary) and status.get("rolloutStage") == SHADOW_STAGE
    return RolloutState(phase=phase, stable=status.get("stableVersion"), shadow=shadow, **values)


def state_to_status(state: RolloutState, status: dict[str, Any]) -> None:
    """Write the state into status in place; fields of a canary disappear with it."""
    if state.stable is not None:
        status["stableVersion"] = state.stable
        status["rolloutPhase"] = state.phase
    fields = {key: getattr(state, attr) for key, attr in _CANARY_FIELDS.items()}
    fields.update({key: rfc3339(t) if (t := getattr(state, attr)) else None for key, attr in _TIME_FIELDS.items()})
    fields["rolloutStage"] = SHADOW_STAGE if state.shadow else None
    for key, value in fields.items():
        if state.canary is None or value is None:
            status.pop(key, None)
        else:
            status[key] = value
