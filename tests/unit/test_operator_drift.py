"""Drift in the operator, pure: window counts scored against the profile, status.drift and Drifted, and
the retrain pipeline starting one run per drift episode, with a cooldown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from conveyor.operator.controller import conditions as c
from conveyor.operator.mlpipeline.plan import DriftSignal
from conveyor.operator.modeldeployment.drift import DriftReading, evaluate, pipeline_to_wake, query, record
from conveyor.runtime.package.drift import bin_counts, references
from conveyor.runtime.package.profile import prediction_distribution, tabular_profile
from conveyor.runtime.spec import ModelDeploymentSpec

NOW = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
SPEC = ModelDeploymentSpec.model_validate(
    {
        "model": {"registryUri": "file:///r", "name": "fraud"},
        "monitoring": {"drift": {"threshold": 0.2}, "window": "2m", "minSamples": 100, "retrainPipeline": "fraud"},
    }
)


def _profile() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    cols = {"amount": rng.lognormal(3.0, 1.0, 4000), "merchant": rng.choice(["a", "b", "c"], 4000)}
    prof = tabular_profile(cols, {"amount": "float", "merchant": "string"})
    prof["predictionDistribution"] = prediction_distribution(rng.integers(0, 2, 4000), ["no", "yes"])
    return prof


def _counts(prof: dict[str, Any], shift: float, n: int = 600, replicas: int = 3) -> dict[str, dict[str, float]]:
    """Bin counts as Prometheus sums them over `replicas` predictors."""
    rng = np.random.default_rng(5)
    live = {"amount": rng.lognormal(3.0 + shift, 1.0, n), "merchant": rng.choice(["a", "b", "c"], n)}
    out: dict[str, dict[str, float]] = {}
    for name, entry in references(prof).items():
        values = list(rng.choice(["no", "yes"], n)) if name == "__prediction__" else list(live[name])
        for part in np.array_split(np.arange(n), replicas):
            for label, k in bin_counts(entry, [values[i] for i in part]).items():
                out.setdefault(name, {})[label] = out.setdefault(name, {}).get(label, 0.0) + k
    return out


def reading(prof: dict[str, Any], shift: float, **kw: Any) -> DriftReading:
    return evaluate(prof, _counts(prof, shift, **kw), DriftReading("v3", NOW, "2m", "psi"), min_samples=100)


def test_the_query_sums_every_replica_by_feature_and_bin() -> None:
    q = query("ml", "fraud", "v3", "2m")
    assert q == (
        'sum by (feature, bin) (increase(conveyor_drift_bin_total{namespace="ml",model_name="fraud",'
        'model_version="v3"}[2m]))'
    )


def test_in_distribution_is_not_drifted_and_a_shift_is_named() -> None:
    prof = _profile()
    status: dict[str, Any] = {"conditions": []}
    events: list[Any] = []
    calm = reading(prof, 0.0)
    assert calm.samples == 600 and set(calm.scores) == {"amount", "merchant", "__prediction__"}
    record(status, events, calm, SPEC, generation=1)
    drifted = c.get_condition(status["conditions"], c.DRIFTED)
    assert drifted is not None and (drifted["status"], drifted["reason"]) == ("False", "NoDrift")
    assert status["drift"]["score"] < 0.2 and status["drift"]["version"] == "v3" and events == []

    shifted = reading(prof, 1.0)
    record(status, events, shifted, SPEC, generation=1)
    drifted = c.get_condition(status["conditions"], c.DRIFTED)
    assert drifted is not None and (drifted["status"], drifted["reason"]) == ("True", "DriftDetected")
    assert "amount" in drifted["message"] and "merchant" not in drifted["message"]
    assert status["drift"]["features"][0]["name"] == "amount" and status["drift"]["score"] > 0.2
    assert status["drift"]["samples"] == 600 and status["drift"]["window"] == "2m"
    assert [e[:2] for e in events] == [("Warning", "DriftDetected")]
    # Still drifted at the next reading: no second event (the event marks the transition).
    record(status, events, shifted, SPEC, generation=1)
    assert len(events) == 1
    record(status, events, calm, SPEC, generation=1)
    assert [e[:2] for e in events][-1] == ("Normal", "DriftResolved")


def test_the_score_does_not_depend_on_the_number_of_replicas() -> None:
    prof = _profile()
    one, three = reading(prof, 0.6, replicas=1), reading(prof, 0.6, replicas=3)
    assert one.scores == three.scores


def test_too_few_rows_or_no_prometheus_leave_drift_unknown() -> None:
    prof = _profile()
    status: dict[str, Any] = {"conditions": []}
    record(status, [], reading(prof, 1.0, n=50), SPEC, generation=1)
    cond = c.get_condition(status["conditions"], c.DRIFTED)
    assert cond is not None and (cond["status"], cond["reason"]) == ("Unknown", "TooFewSamples")
    assert "50 live row(s)" in cond["message"]
    record(status, [], DriftReading("v3", NOW, "2m", "psi", error="Prometheus unreachable"), SPEC, generation=1)
    cond = c.get_condition(status["conditions"], c.DRIFTED)
    assert cond is not None and cond["reason"] == "DriftUnmeasured" and "unreachable" in cond["message"]


def test_the_retrain_pipeline_is_woken_on_a_transition_only() -> None:
    prof = _profile()
    old: dict[str, Any] = {"conditions": []}
    record(old, [], reading(prof, 0.0), SPEC, generation=1)
    new = {"conditions": [dict(x) for x in old["conditions"]]}
    assert pipeline_to_wake(old, new, SPEC) is None
    record(new, [], reading(prof, 1.0), SPEC, generation=1)
    assert pipeline_to_wake(old, new, SPEC) == "fraud"


# ---------------------------------------------------------------- the retrain trigger


def _pipeline_plan(status: dict[str, Any], drift: DriftSignal | None, now: datetime = NOW, on_drift: bool = True) -> Any:
    from conveyor.operator.mlpipeline.build import spec_hash
    from conveyor.operator.mlpipeline.plan import plan_pipeline
    from conveyor.runtime.spec import MLPipelineSpec

    body = {
        "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
        "registry": {"uri": "file:///r", "modelName": "fraud"},
        "deploy": {"modelDeployment": "fraud"},
        "triggers": {"onDrift": on_drift},
    }
    base = {"lastRun": 1, "lastSpecHash": spec_hash(body), "runs": [{"run": 1, "outcome": "Succeeded", "rayJob": "fraud-1"}]}
    obj = {
        "metadata": {"name": "fraud", "namespace": "ml", "uid": "u", "generation": 1, "creationTimestamp": "2026-01-05T11:00:00Z"},
        "spec": body,
        "status": {**base, **status},
    }
    return plan_pipeline(obj, MLPipelineSpec.model_validate(body), None, {}, {}, now, drift=drift)


def test_drift_starts_one_run_per_episode_with_a_cooldown() -> None:
    episode = DriftSignal("fraud", "2026-01-05T11:59:00Z", "psi over 0.2: amount (0.9)", cooldown_seconds=600)
    p = _pipeline_plan({}, episode)
    assert p.start_run == 2 and p.status["runs"][-1]["trigger"] == "Drift"
    assert p.status["lastDriftEpisode"] == episode.episode and p.status["lastDriftRunTime"] == "2026-01-05T12:00:00Z"
    assert ("Normal", "DriftRetrain") in [e[:2] for e in p.events]
    # The same episode, after the run: nothing more.
    served = {k: p.status[k] for k in ("lastDriftEpisode", "lastDriftRunTime")}
    assert _pipeline_plan(served, episode, NOW + timedelta(hours=2)).start_run is None
    # A new episode inside the cooldown waits for its end (requeued then), and starts after it.
    later = DriftSignal("fraud", "2026-01-05T12:05:00Z", "psi over 0.2: amount (0.7)", cooldown_seconds=600)
    waiting = _pipeline_plan(served, later, NOW + timedelta(minutes=6))
    assert waiting.start_run is None and waiting.requeue_after is not None and 239 < waiting.requeue_after < 242
    assert _pipeline_plan(served, later, NOW + timedelta(minutes=11)).start_run == 2
    # Without triggers.onDrift the deployment's drift starts nothing.
    assert _pipeline_plan({}, episode, on_drift=False).start_run is None


def test_online_accuracy_below_the_minimum_counts_as_drift() -> None:
    from dataclasses import replace

    from conveyor.operator.modeldeployment.drift import accuracy_query

    assert accuracy_query("ml", "fraud", "v3", "2m") == (
        'sum by (result) (increase(conveyor_feedback_total{namespace="ml",model_name="fraud",model_version="v3"}[2m]))'
    )
    spec = SPEC.model_copy(update={"monitoring": SPEC.monitoring.model_copy(update={"min_accuracy": 0.8})})
    calm = reading(_profile(), 0.0)
    status: dict[str, Any] = {"conditions": []}
    events: list[Any] = []
    record(status, events, replace(calm, accuracy=0.9, labelled=400), spec, generation=1)
    assert c.get_condition(status["conditions"], c.DRIFTED)["status"] == "False"
    assert (status["drift"]["accuracy"], status["drift"]["labelledRows"]) == (0.9, 400)
    record(status, events, replace(calm, accuracy=0.5, labelled=40), spec, generation=1)  # too few labels
    assert c.get_condition(status["conditions"], c.DRIFTED)["status"] == "False"
    record(status, events, replace(calm, accuracy=0.5, labelled=400), spec, generation=1)
    cond = c.get_condition(status["conditions"], c.DRIFTED)
    assert (cond["status"], cond["reason"]) == ("True", "AccuracyBelowMinimum") and "0.5" in cond["message"]
    assert [e[:2] for e in events] == [("Warning", "AccuracyBelowMinimum")]
