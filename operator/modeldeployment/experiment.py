"""A/B/N experiments (`strategy: abn`): several versions served side by side at fixed weights for a
duration, measured per version from Prometheus, then a verdict with its statistical significance.

Pure: `verdict(figures, ...)` and `step(state, spec, ...)` take values and return values (unit-tested);
the handler reads the figures (reconcile.py, `queries`) and plan.py serves the versions (build.py).

Figures per version, over the experiment so far (from its start to now): requests, success rate (no 5xx),
latency p99 in ms, online accuracy (the share of labelled predictions that were right, from the
predictors' `conveyor_feedback_total{result=correct|incorrect}`: the closed loop's ground truth posted to
the feedback route), and every custom check of `spec.rollout.analysis.checks` (shown, not judged).

The verdict compares one proportion, `experiment.metric`: accuracy (correct / labelled) or successRate
(answered without a 5xx / requests). The test: the version with the highest rate is compared with every
other one by a two-proportion z-test (pooled standard error, two-sided p-value), each at
alpha = (1 - confidence) / (N - 1) (Bonferroni: the family-wise error stays at most 1 - confidence). It is
the Winner only if it beats every other version at that level; otherwise NoSignificantDifference (naming
the closest rival and its p-value). No verdict before every version has `minSamples` trials (labelled
rows for accuracy, requests for successRate): InsufficientSamples. The z-test's normal approximation
wants at least ~10 successes and ~10 failures per version: keep minSamples at 100 or more in practice.

Lifecycle (`status.experiment.phase`): Starting (until KServe reports the split served), Running (the
figures refreshed every `rollout.interval`), then at `duration`: Concluded (the verdict stays; the versions
keep serving at their weights until the spec changes), or with `autoPromote` and a Winner, Promoted: the
winner becomes the stable version and serves alone. Changing the versions, weights or duration starts a
new experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from conveyor.operator.controller.times import parse_time, rfc3339

TEST = "two-proportion z-test (pooled), two-sided, Bonferroni-corrected over N-1 comparisons with the best"

STARTING = "Starting"
RUNNING = "Running"
CONCLUDED = "Concluded"
PROMOTED = "Promoted"


@dataclass(frozen=True)
class Figures:
    """One version's measurements over the experiment so far (None: no data)."""

    version: str
    weight: int
    requests: float | None = None
    success_rate: float | None = None
    latency_ms: float | None = None
    correct: float | None = None
    labelled: float | None = None
    custom: dict[str, float | None] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.correct is not None and self.labelled else None

    def trials(self, metric: str) -> tuple[float, float]:
        """(successes, trials) of the metric the verdict compares."""
        if metric == "accuracy":
            return self.correct or 0.0, self.labelled or 0.0
        n = self.requests or 0.0
        return (self.success_rate or 0.0) * n, n

    def to_status(self) -> dict[str, Any]:
        values = {"version": self.version, "weight": self.weight, "requests": self.requests,
                  "successRate": self.success_rate, "latencyP99Ms": self.latency_ms, "accuracy": self.accuracy,
                  "labelled": self.labelled}
        out = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()
               if v is not None and not (isinstance(v, float) and not math.isfinite(v))}
        custom = {k: round(v, 6) for k, v in self.custom.items() if v is not None and math.isfinite(v)}
        if custom:
            out["custom"] = custom
        return out


@dataclass(frozen=True)
class Comparison:
    version: str  # the rival the best version is compared with
    rate: float
    z: float
    p_value: float
    significant: bool


@dataclass(frozen=True)
class Verdict:
    outcome: str  # Winner | NoSignificantDifference | InsufficientSamples
    metric: str
    winner: str | None = None
    best: str | None = None
    alpha: float = 0.0
    min_samples: int = 0
    comparisons: tuple[Comparison, ...] = ()
    message: str = ""

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"outcome": self.outcome, "metric": self.metric, "test": TEST,
                               "alphaPerComparison": round(self.alpha, 6), "minSamples": self.min_samples,
                               "message": self.message}
        if self.winner:
            out["winner"] = self.winner
        if self.best:
            out["best"] = self.best
        if self.comparisons:
            out["comparisons"] = [{"version": c.version, "rate": round(c.rate, 6), "z": round(c.z, 4),
                                   "pValue": float(f"{c.p_value:.6g}"), "significant": c.significant}
                                  for c in self.comparisons]
        return out


def two_proportion_z(s1: float, n1: float, s2: float, n2: float) -> tuple[float, float]:
    """(z, two-sided p-value) of H0: p1 == p2, with the pooled standard error."""
    p1, p2 = s1 / n1, s2 / n2
    pooled = (s1 + s2) / (n1 + n2)
    # max(): rates read from Prometheus can exceed 1 by a rounding (a success rate of 1.0000000001).
    se = math.sqrt(max(pooled * (1 - pooled), 0.0) * (1 / n1 + 1 / n2))
    if se == 0:  # every trial of both came out the same: the rates are equal (up to a rounding)
        return 0.0, 1.0
    z = (p1 - p2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def verdict(figures: list[Figures], *, metric: str, min_samples: int, confidence: float) -> Verdict:
    """The experiment's verdict (see the module docstring for the test)."""
    alpha = (1 - confidence) / max(1, len(figures) - 1)
    base = {"metric": metric, "alpha": alpha, "min_samples": min_samples}
    short = [f"{f.version} {f.trials(metric)[1]:.0f}" for f in figures if f.trials(metric)[1] < min_samples]
    if short:
        what = "labelled rows" if metric == "accuracy" else "requests"
        return Verdict("InsufficientSamples", **base,  # type: ignore[arg-type]
                       message=f"fewer than minSamples {min_samples} {what}: {', '.join(short)}")
    rates = {f.version: f.trials(metric)[0] / f.trials(metric)[1] for f in figures}
    best = max(figures, key=lambda f: rates[f.version])  # ties: the first in spec order
    comparisons = []
    for f in figures:
        if f is best:
            continue
        z, p = two_proportion_z(*best.trials(metric), *f.trials(metric))
        comparisons.append(Comparison(f.version, rates[f.version], z, p, p < alpha and z > 0))
    head = f"{best.version} has the highest {metric} ({rates[best.version]:.4f})"
    if all(c.significant for c in comparisons):
        return Verdict("Winner", **base, winner=best.version, best=best.version,  # type: ignore[arg-type]
                       comparisons=tuple(comparisons),
                       message=f"{head}; better than every other version at p < {alpha:.3g} each")
    rival = max(comparisons, key=lambda c: c.p_value)
    return Verdict("NoSignificantDifference", **base, best=best.version,  # type: ignore[arg-type]
                   comparisons=tuple(comparisons),
                   message=f"{head}, but not significantly better than {rival.version} "
                           f"({rival.rate:.4f}, p = {rival.p_value:.3g} >= {alpha:.3g})")


# ---------------------------------------------------------------- lifecycle


def key_of(spec: Any) -> str:
    """What identifies one experiment: its versions, weights and duration (a change starts a new one)."""
    return ",".join(f"{v.version}:{v.weight}" for v in spec.versions) + f"/{spec.duration}"


@dataclass(frozen=True)
class Step:
    status: dict[str, Any]
    events: list[tuple[str, str, str]]
    promote: str | None = None  # the version to make stable (autoPromote and a Winner)


def step(current: dict[str, Any] | None, spec: Any, *, duration: timedelta, interval: timedelta, now: datetime,
         served: bool, figures: list[Figures] | None, error: str | None = None) -> Step:
    """The experiment's next status (status.experiment) from the current one, the spec
    (ExperimentSpec), whether KServe reports the split served, and the figures read when due."""
    key = key_of(spec)
    events: list[tuple[str, str, str]] = []
    exp = dict(current or {})
    if exp.get("key") != key:
        split = ", ".join(f"{v.version} {v.weight}%" for v in spec.versions)
        exp = {"key": key, "phase": STARTING, "versions": [{"version": v.version, "weight": v.weight}
                                                           for v in spec.versions]}
        events.append(("Normal", "ExperimentStarted", f"A/B/N experiment: {split} for {spec.duration}"))
    phase = exp["phase"]
    if phase == STARTING and served:
        exp.update(phase=RUNNING, startTime=rfc3339(now), endTime=rfc3339(now + duration),
                   nextReadTime=rfc3339(now + interval))
        return Step(exp, events)
    if phase != RUNNING:
        return Step(exp, events)
    if error is not None:
        exp["message"] = error
        exp["nextReadTime"] = rfc3339(now + min(interval, timedelta(seconds=10)))
        return Step(exp, events)
    if figures is None:
        return Step(exp, events)
    v = verdict(figures, metric=spec.metric, min_samples=spec.min_samples, confidence=spec.confidence)
    exp.pop("message", None)
    exp.update(figures=[f.to_status() for f in figures], verdict=v.to_status(), lastReadTime=rfc3339(now),
               nextReadTime=rfc3339(now + interval))
    end = parse_time(exp.get("endTime"))
    if end is None or now < end:
        return Step(exp, events)
    exp.pop("nextReadTime", None)
    if spec.auto_promote and v.winner:
        exp["phase"] = PROMOTED
        events.append(("Normal", "ExperimentPromoted", f"{v.message}; {v.winner} promoted (autoPromote)"))
        return Step(exp, events, promote=v.winner)
    exp["phase"] = CONCLUDED
    events.append(("Normal", "ExperimentConcluded", f"{v.outcome}: {v.message}"))
    return Step(exp, events)


def read_due(exp: dict[str, Any] | None, now: datetime) -> bool:
    t = parse_time((exp or {}).get("nextReadTime"))
    return (exp or {}).get("phase") == RUNNING and t is not None and now >= t


def elapsed_window(exp: dict[str, Any], now: datetime) -> str:
    """The PromQL range from the experiment's start to now (whole seconds, at least 1)."""
    start = parse_time(exp.get("startTime")) or now
    return f"{max(1, math.ceil((now - start).total_seconds()))}s"


def queries(namespace: str, deployment: str, version: str, window: str, checks: list[Any]) -> dict[str, str]:
    """Every figure's PromQL for one version over `window`."""
    sel = f'namespace="{namespace}",model_name="{deployment}",model_version="{version}"'

    def inc(metric: str, extra: str = "") -> str:
        return f"sum(increase({metric}{{{sel}{extra}}}[{window}]))"

    out = {
        "requests": inc("conveyor_requests_total"),
        "ok": inc("conveyor_requests_total", ',code!~"5.."'),
        "latency": f"histogram_quantile(0.99, sum by (le) (rate(conveyor_request_duration_seconds_bucket{{{sel}}}"
                   f"[{window}]))) * 1000",
        "correct": inc("conveyor_feedback_total", ',result="correct"'),
        "labelled": inc("conveyor_feedback_total", ',result=~"correct|incorrect"'),
    }
    from conveyor.operator.modeldeployment.analysis import render

    for check in checks:
        out["custom:" + check.name] = render(check.query, namespace, deployment, version, window)
    return out


def figures_from(version: str, weight: int, values: dict[str, float | None]) -> Figures:
    requests, ok = values.get("requests"), values.get("ok")
    rate = ok / requests if requests and ok is not None else None
    custom = {k.split(":", 1)[1]: v for k, v in values.items() if k.startswith("custom:")}
    return Figures(version, weight, requests, rate, values.get("latency"), values.get("correct"),
                   values.get("labelled"), custom)
