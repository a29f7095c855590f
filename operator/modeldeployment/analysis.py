"""A canary analysis from Prometheus: instant queries over `analysis.window`, for the candidate version
and, side by side, the stable one (shown, never judged).

Built-in checks read the predictor's own metrics (conveyor.runtime.serving.metrics), selected by
`namespace` (the scrape target's namespace: a PodMonitor on a cluster, the file-based discovery of the
local stack), `model_name` (the InferenceService, i.e. the ModelDeployment's name) and `model_version`:
- `requests`: requests in the window; fewer than `minRequests` makes the analysis Inconclusive;
- `successRate`: the share of requests not answered with a 5xx, at least `minSuccessRate`;
- `latencyP<q>`: the q-th percentile of `conveyor_request_duration_seconds` in ms, at most `latency.maxMs`.
`checks[]` are PromQL templates with `{{namespace}}`, `{{deployment}}` (also `{{name}}`), `{{version}}`
and `{{window}}`; the result must be one number within [min, max].

Explicit rules for what is not a number: a query that fails (Prometheus unreachable, a PromQL error)
makes the analysis an Error, never a pass. An empty result or NaN means no data in the window:
Inconclusive (the rollout waits, then pauses for a person). A custom query that returns several series
is an Error (it must aggregate to one). +Inf compares as a number (a latency past the highest bucket
fails its bound).

Shadow (the candidate receives mirrored requests only, runtime/serving/shadow.py): the same checks read
the stable predictor's mirror counters `conveyor_shadow_requests_total{shadow_version=<candidate>}`:
`requests` counts mirrored requests that got an answer or an error (not those dropped), `successRate`
the share the shadow answered (not an error or a timeout), `latencyP<q>` the shadow's latency as mirrored,
and `agreement` (`agree / (agree + disagree)`) must be at least `minAgreement` when set (shown always).
The stable column is empty: the stable version is not being judged against itself.

`judge` is pure (values in, verdict out) and unit-tested; `analyse` runs the queries concurrently.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from conveyor.operator.controller.prometheus import Prometheus, PrometheusError
from conveyor.operator.modeldeployment.rollout import Analysis, CheckResult, Verdict
from conveyor.runtime.spec import AnalysisSpec

REQUESTS = "requests"
SUCCESS_RATE = "successRate"
AGREEMENT = "agreement"

# A query's outcome: a number, None (an empty result) or the error that prevented an answer.
Outcome = float | None | PrometheusError


@dataclass(frozen=True)
class Target:
    namespace: str
    deployment: str
    candidate: str
    stable: str | None
    shadow: bool = False  # the candidate is a shadow: read the stable predictor's mirror counters


def render(template: str, namespace: str, deployment: str, version: str, window: str) -> str:
    for key, value in (("namespace", namespace), ("deployment", deployment), ("name", deployment),
                       ("version", version), ("window", window)):
        template = template.replace("{{" + key + "}}", value).replace("{{ " + key + " }}", value)
    return template


def _selector(t: Target, version: str, extra: str = "") -> str:
    return f'{{namespace="{t.namespace}",model_name="{t.deployment}",model_version="{version}"{extra}}}'


def latency_name(spec: AnalysisSpec) -> str:
    return f"latencyP{spec.latency.percentile}" if spec.latency else ""


def queries(spec: AnalysisSpec, t: Target, version: str) -> dict[str, str]:
    """Every check's PromQL for one version, by check name."""
    w = spec.window
    total = f"sum(increase(conveyor_requests_total{_selector(t, version)}[{w}]))"
    not_5xx = ',code!~"5.."'
    ok = f"sum(increase(conveyor_requests_total{_selector(t, version, not_5xx)}[{w}]))"
    out = {REQUESTS: total, SUCCESS_RATE: f"{ok} / {total}"}
    if spec.latency:
        q = spec.latency.percentile / 100
        buckets = f"conveyor_request_duration_seconds_bucket{_selector(t, version)}[{w}]"
        out[latency_name(spec)] = f"histogram_quantile({q:g}, sum by (le) (rate({buckets}))) * 1000"
    for check in spec.checks:
        out[check.name] = render(check.query, t.namespace, t.deployment, version, w)
    return out


def shadow_queries(spec: AnalysisSpec, t: Target) -> dict[str, str]:
    """The shadow's checks, from the mirror's counters on the stable predictor (see the module docstring)."""
    w = spec.window
    sel = f'namespace="{t.namespace}",model_name="{t.deployment}",shadow_version="{t.candidate}"'

    def count(results: str) -> str:
        return f'sum(increase(conveyor_shadow_requests_total{{{sel},result=~"{results}"}}[{w}]))'

    answered = count("agree|disagree|incomparable|error|timeout")
    out = {REQUESTS: answered,
           SUCCESS_RATE: f"{count('agree|disagree|incomparable')} / {answered}",
           AGREEMENT: f"{count('agree')} / {count('agree|disagree')}"}
    if spec.latency:
        q = spec.latency.percentile / 100
        buckets = f"conveyor_shadow_duration_seconds_bucket{{{sel}}}[{w}]"
        out[latency_name(spec)] = f"histogram_quantile({q:g}, sum by (le) (rate({buckets}))) * 1000"
    for check in spec.checks:
        out[check.name] = render(check.query, t.namespace, t.deployment, t.candidate, w)
    return out


async def _one(prom: Prometheus, promql: str) -> Outcome:
    try:
        samples = await prom.query(promql)
    except PrometheusError as e:
        return e
    if not samples:
        return None
    if len(samples) > 1:
        return PrometheusError(f"query {promql!r} returned {len(samples)} series; a check needs one number (aggregate it)")
    return samples[0].value


async def analyse(prom: Prometheus | None, spec: AnalysisSpec, t: Target) -> Analysis:
    """Query every check for the candidate and the stable version, and judge the candidate."""
    if prom is None:
        return Analysis("Error", message="no Prometheus configured (--prometheus-url / CONVEYOR_PROMETHEUS_URL)")
    cand = shadow_queries(spec, t) if t.shadow else queries(spec, t, t.candidate)
    stable = queries(spec, t, t.stable) if t.stable and not t.shadow else {}
    names = list(cand)
    results = await asyncio.gather(*(_one(prom, cand[n]) for n in names), *(_one(prom, stable[n]) for n in stable))
    measured = {n: (results[i], results[len(names) + i] if stable else None) for i, n in enumerate(names)}
    return judge(spec, measured)


def _shown(v: Outcome) -> float | None:
    return v if isinstance(v, float) and not math.isnan(v) else None


def _bound(value: float, lo: float | None, hi: float | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _threshold(lo: float | None, hi: float | None, unit: str = "") -> str:
    parts = ([f">= {lo:g}{unit}"] if lo is not None else []) + ([f"<= {hi:g}{unit}"] if hi is not None else [])
    return " and ".join(parts)


def _check(name: str, cand: Outcome, stable: Outcome, lo: float | None, hi: float | None, unit: str = "") -> CheckResult:
    threshold = _threshold(lo, hi, unit)
    shown = {"candidate": _shown(cand), "stable": _shown(stable), "threshold": threshold}
    if isinstance(cand, PrometheusError):
        return CheckResult(name, "Error", message=str(cand), **shown)  # type: ignore[arg-type]
    if cand is None or math.isnan(cand):
        return CheckResult(name, "Inconclusive", message=f"{name}: no data in the window", **shown)  # type: ignore[arg-type]
    verdict: Verdict = "Passed" if _bound(cand, lo, hi) else "Failed"
    message = f"{name} {cand:.4g}{unit}" + ("" if verdict == "Passed" else f", wanted {threshold}")
    return CheckResult(name, verdict, message=message, **shown)  # type: ignore[arg-type]


def judge(spec: AnalysisSpec, measured: dict[str, tuple[Outcome, Outcome]]) -> Analysis:
    """The verdict from every check's (candidate, stable) outcome. Order: an Error anywhere; too few
    requests (Inconclusive, nothing judged on too little data); a Failed check; an Inconclusive one; Passed."""
    requests = measured[REQUESTS]
    checks = [_check(REQUESTS, *requests, spec.min_requests, None)]
    checks.append(_check(SUCCESS_RATE, *measured[SUCCESS_RATE], spec.min_success_rate, None))
    if spec.latency:
        name = latency_name(spec)
        checks.append(_check(name, *measured[name], None, spec.latency.max_ms, "ms"))
    if AGREEMENT in measured:
        checks.append(_check(AGREEMENT, *measured[AGREEMENT], spec.min_agreement, None))
    checks += [_check(c.name, *measured[c.name], c.min, c.max) for c in spec.checks]
    errors = [c for c in checks if c.verdict == "Error"]
    if errors:
        return Analysis("Error", tuple(checks), errors[0].message)
    if checks[0].verdict != "Passed":
        # Too little traffic to judge anything (no requests at all reads as empty, or as NaN rates).
        count = _shown(requests[0]) or 0.0
        head = CheckResult(REQUESTS, "Inconclusive", checks[0].candidate, checks[0].stable, checks[0].threshold,
                           f"{count:.0f} requests in {spec.window}, fewer than minRequests {spec.min_requests}")
        return Analysis("Inconclusive", (head, *map(_unjudged, checks[1:])), head.message)
    for verdict in ("Failed", "Inconclusive"):  # a clear failure outweighs another check's missing data
        first = next((c for c in checks if c.verdict == verdict), None)
        if first is not None:
            return Analysis(verdict, tuple(checks), first.message)  # type: ignore[arg-type]
    return Analysis("Passed", tuple(checks), "every check passed")


def _unjudged(c: CheckResult) -> CheckResult:
    return CheckResult(c.name, "Inconclusive", c.candidate, c.stable, c.threshold, f"{c.name}: not judged on too little traffic")
