"""Drift of a ModelDeployment's live traffic: measured from Prometheus (observe), judged purely (plan).

Every `spec.monitoring.interval` the reconcile's observe phase asks Prometheus for the stable version's
live inputs and predictions counted per training-profile bin over `spec.monitoring.window`, summed over
every replica and worker process (`conveyor_drift_bin_total`, additive, so the answer does not depend on
how many predictors served the traffic), and reads that version's `profile.json` from the registry.
The pure part scores the counts against the profile (`conveyor.runtime.package.drift.score_counts`, the
math the predictor's own gauges use) and writes `status.drift` and the `Drifted` condition:

- True (DriftDetected) when the overall score (the largest feature or prediction score) exceeds
  `monitoring.drift.threshold`, the message naming the features over it; a Warning event on the turn;
- False (NoDrift) otherwise; a Normal event when drift ends;
- Unknown when the window holds fewer than `monitoring.minSamples` rows or the reading failed.

Ground truth counts too: the predictors count labelled rows as correct or incorrect
(`conveyor_feedback_total`, additive), so the same reading carries the window's online accuracy
(`status.drift.accuracy`); with `monitoring.minAccuracy` set, an accuracy below it over at least
`minSamples` labelled rows makes the deployment Drifted (reason AccuracyBelowMinimum) and retrains it
like input drift does.

The condition's lastTransitionTime names the drift episode: the MLPipeline named in
`monitoring.retrainPipeline` starts at most one run per episode (see mlpipeline/plan.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.operator.controller import conditions as c
from conveyor.operator.controller.events import Event
from conveyor.operator.controller.prometheus import Prometheus, PrometheusError
from conveyor.operator.controller.times import parse_time, rfc3339
from conveyor.operator.modeldeployment.rollout import parse_duration
from conveyor.runtime.package.drift import references, score_counts
from conveyor.runtime.package.registry import PackageError
from conveyor.runtime.spec import ModelDeploymentSpec

if TYPE_CHECKING:
    from conveyor.operator.controller.cache import Key
    from conveyor.operator.controller.manager import Operator

SERIES = "conveyor_drift_bin_total"
FEEDBACK_SERIES = "conveyor_feedback_total"
TOP_FEATURES = 5

# profile.json of a committed version never changes: read once per package.
_profiles: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class DriftReading:
    """One measurement of one version's live traffic (or why there is none)."""

    version: str
    time: datetime
    window: str
    method: str
    samples: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    accuracy: float | None = None
    labelled: int = 0


def due(status: dict[str, Any], spec: ModelDeploymentSpec, now: datetime) -> bool:
    last = parse_time((status.get("drift") or {}).get("time"))
    return last is None or now - last >= parse_duration(spec.monitoring.interval)


def seconds_until_due(op: Operator, status: dict[str, Any], spec: ModelDeploymentSpec, now: datetime) -> float | None:
    """When the next measurement is due (None: nothing is served, or no Prometheus to measure with)."""
    if op.prometheus is None or not status.get("stableVersion"):
        return None
    last = parse_time((status.get("drift") or {}).get("time"))
    if last is None:
        return 0.0
    return max(0.0, (last + parse_duration(spec.monitoring.interval) - now).total_seconds())


def query(namespace: str, deployment: str, version: str, window: str, series: str = SERIES, by: str = "feature, bin") -> str:
    selector = f'namespace="{namespace}",model_name="{deployment}",model_version="{version}"'
    return f"sum by ({by}) (increase({series}{{{selector}}}[{window}]))"


def accuracy_query(namespace: str, deployment: str, version: str, window: str) -> str:
    return query(namespace, deployment, version, window, FEEDBACK_SERIES, "result")


async def measure_if_due(
    op: Operator, key: Key, deployment: dict[str, Any], spec: ModelDeploymentSpec, now: datetime
) -> DriftReading | None:
    """The stable version's reading when one is due (None when not, or when nothing is served yet)."""
    status = deployment.get("status") or {}
    version = status.get("stableVersion")
    # Without a Prometheus nothing can be measured: Drifted stays Unknown, and no status write each interval.
    if op.prometheus is None or not version or not due(status, spec, now):
        return None
    registry = op.registry(spec.model.registry_uri, spec.model.name)
    return await measure(op.prometheus, cached_profile_reader(registry), key[0], key[1], version, spec, now)


def pipeline_to_wake(old: dict[str, Any], new: dict[str, Any], spec: ModelDeploymentSpec) -> str | None:
    """The retrain pipeline, when the Drifted condition changed (its reconcile decides on a run)."""
    pipeline = spec.monitoring.retrain_pipeline
    before = c.get_condition(old.get("conditions"), c.DRIFTED) or {}
    after = c.get_condition(new.get("conditions"), c.DRIFTED) or {}
    changed = (before.get("status"), before.get("lastTransitionTime")) != (after.get("status"), after.get("lastTransitionTime"))
    return pipeline if pipeline and changed else None


async def measure(
    prometheus: Prometheus | None,
    read_profile: Callable[[str], dict[str, Any]],
    namespace: str,
    deployment: str,
    version: str,
    spec: ModelDeploymentSpec,
    now: datetime,
) -> DriftReading:
    """Observe side: the window's bin counts from Prometheus and the version's profile (blocking read,
    in a thread), then the pure evaluation."""
    m = spec.monitoring
    base = DriftReading(version, now, m.window, m.drift.method)
    if prometheus is None:
        return _failed(base, "no Prometheus configured (--prometheus-url / CONVEYOR_PROMETHEUS_URL)")
    try:
        profile = await asyncio.to_thread(read_profile, version)
        samples = await prometheus.query(query(namespace, deployment, version, m.window))
        feedback = await prometheus.query(accuracy_query(namespace, deployment, version, m.window))
    except (PrometheusError, PackageError, OSError) as e:
        return _failed(base, str(e))
    counts: dict[str, dict[str, float]] = {}
    for s in samples:
        feature, label = s.labels.get("feature"), s.labels.get("bin")
        if feature is not None and label is not None:
            counts.setdefault(feature, {})[label] = s.value
    results = {s.labels.get("result", ""): s.value for s in feedback}
    reading = evaluate(profile, counts, base, min_samples=m.min_samples)
    labelled = results.get("correct", 0.0) + results.get("incorrect", 0.0)
    if labelled > 0:
        reading = replace(reading, accuracy=results.get("correct", 0.0) / labelled, labelled=round(labelled))
    return reading


def _failed(base: DriftReading, why: str) -> DriftReading:
    return DriftReading(base.version, base.time, base.window, base.method, error=why[:500])


def cached_profile_reader(registry: Any) -> Callable[[str], dict[str, Any]]:
    def read(version: str) -> dict[str, Any]:
        uri = registry.package_uri(version)
        if uri not in _profiles:
            _profiles[uri] = registry.read_json(version, "profile.json")
        return _profiles[uri]

    return read


def evaluate(
    profile: dict[str, Any], counts: dict[str, dict[str, float]], base: DriftReading, *, min_samples: int
) -> DriftReading:
    """Pure: each profiled input's (and the predictions') summed window counts scored against the profile;
    an input with fewer than `min_samples` rows counted gets no score."""
    scores: dict[str, float] = {}
    samples = 0.0
    for name, entry in references(profile).items():
        bins = counts.get(name) or {}
        total = sum(v for v in bins.values() if v > 0)
        samples = max(samples, total)
        if total >= min_samples:
            score = score_counts(entry, bins, base.method)
            if score is not None:
                scores[name] = score
    return DriftReading(base.version, base.time, base.window, base.method, round(samples), scores)


def record(
    status: dict[str, Any],
    events: list[Event],
    reading: DriftReading | None,
    spec: ModelDeploymentSpec,
    *,
    generation: int | None,
) -> None:
    """Plan side, pure: `status.drift` and the `Drifted` condition from a reading (None: none was due)."""
    if reading is None:
        return
    conds = status.setdefault("conditions", [])
    ts = rfc3339(reading.time)
    drift: dict[str, Any] = {
        "time": ts,
        "version": reading.version,
        "method": reading.method,
        "window": reading.window,
        "samples": reading.samples,
    }
    threshold = spec.monitoring.drift.threshold

    def put(st: str, reason: str, message: str) -> bool:
        return c.set_condition(conds, c.DRIFTED, st, reason, message, generation=generation, now=ts)

    if reading.accuracy is not None:
        drift["accuracy"] = round(reading.accuracy, 6)
        drift["labelledRows"] = reading.labelled
    if reading.error is not None:
        status["drift"] = {**(status.get("drift") or {}), "time": ts}
        put(c.UNKNOWN, "DriftUnmeasured", f"Drift of {reading.version} could not be measured: {reading.error}")
        return
    low = _accuracy_below_minimum(reading, spec)
    if low is not None:
        status["drift"] = {**drift, **({"score": round(max(reading.scores.values()), 6)} if reading.scores else {})}
        was = (c.get_condition(conds, c.DRIFTED) or {}).get("status")
        if put(c.TRUE, "AccuracyBelowMinimum", low) and was != c.TRUE:
            events.append(("Warning", "AccuracyBelowMinimum", low))
        return
    if not reading.scores:
        status["drift"] = drift
        put(
            c.UNKNOWN,
            "TooFewSamples",
            f"{reading.samples} live row(s) of {reading.version} in the last {reading.window}; "
            f"monitoring.minSamples is {spec.monitoring.min_samples}",
        )
        return
    ranked = sorted(reading.scores.items(), key=lambda kv: (-kv[1], kv[0]))
    overall = ranked[0][1]
    drift["score"] = round(overall, 6)
    drift["features"] = [{"name": n, "score": round(v, 6)} for n, v in ranked[:TOP_FEATURES]]
    status["drift"] = drift
    was = (c.get_condition(conds, c.DRIFTED) or {}).get("status")
    if overall > threshold:
        over = ", ".join(f"{n} ({v:.3g})" for n, v in ranked if v > threshold)
        message = f"{reading.method} over {threshold:g} in the last {reading.window} of {reading.version}: {over}"
        put(c.TRUE, "DriftDetected", message)
        if was != c.TRUE:
            events.append(("Warning", "DriftDetected", message))
        return
    top = ", ".join(f"{n} ({v:.3g})" for n, v in ranked[:3])
    put(c.FALSE, "NoDrift", f"{reading.method} at most {overall:.3g} (threshold {threshold:g}) over {reading.window}: {top}")
    if was == c.TRUE:
        events.append(("Normal", "DriftResolved", f"{reading.version}'s inputs are back within {threshold:g}"))


def _accuracy_below_minimum(reading: DriftReading, spec: ModelDeploymentSpec) -> str | None:
    """Why the labelled predictions count as drift (None: they do not, or too few got ground truth)."""
    floor = spec.monitoring.min_accuracy
    if floor is None or reading.accuracy is None or reading.labelled < spec.monitoring.min_samples:
        return None
    if reading.accuracy >= floor:
        return None
    return (
        f"online accuracy of {reading.version} is {reading.accuracy:.3g} over {reading.labelled} labelled rows in the "
        f"last {reading.window}, below monitoring.minAccuracy {floor:g}"
    )
