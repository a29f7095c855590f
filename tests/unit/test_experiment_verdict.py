"""The A/B/N verdict and lifecycle (operator/modeldeployment/experiment.py), pure: figures in, verdict out."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.operator.modeldeployment.experiment import (
    CONCLUDED,
    PROMOTED,
    RUNNING,
    STARTING,
    Figures,
    figures_from,
    queries,
    step,
    two_proportion_z,
    verdict,
)
from conveyor.runtime.spec import ExperimentSpec

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def acc(version: str, correct: float, labelled: float, weight: int = 50) -> Figures:
    return Figures(version, weight, requests=labelled, success_rate=1.0, correct=correct, labelled=labelled)


def test_z_test_matches_the_textbook_value() -> None:
    # 90/100 vs 80/100: pooled 0.85, se = sqrt(.85*.15*.02) = 0.0505, z = 1.98, p = 0.0477
    z, p = two_proportion_z(90, 100, 80, 100)
    assert z == pytest.approx(1.980, abs=1e-3) and p == pytest.approx(0.0477, abs=1e-4)
    assert two_proportion_z(5, 10, 5, 10) == (0.0, 1.0)
    assert two_proportion_z(10, 10, 0, 10)[0] > 4
    # Every request succeeded, as Prometheus's rates say it: 1.0000000001 x n successes (was a math domain error).
    assert two_proportion_z(1.0000000001 * 500, 500, 1.0000000001 * 300, 300) == (0.0, 1.0)


def test_a_clearly_better_version_wins() -> None:
    v = verdict([acc("v1", 800, 1000), acc("v2", 900, 1000), acc("v3", 700, 1000)],
                metric="accuracy", min_samples=100, confidence=0.95)
    assert (v.outcome, v.winner) == ("Winner", "v2")
    assert v.alpha == pytest.approx(0.025)  # Bonferroni over two comparisons
    assert {c.version for c in v.comparisons} == {"v1", "v3"} and all(c.significant for c in v.comparisons)


def test_a_small_difference_is_not_significant_and_names_the_rival() -> None:
    v = verdict([acc("v1", 90, 100), acc("v2", 92, 100)], metric="accuracy", min_samples=50, confidence=0.95)
    assert v.outcome == "NoSignificantDifference" and v.winner is None and v.best == "v2"
    assert "v1" in v.message and "p =" in v.message


def test_bonferroni_makes_more_versions_harder_to_win() -> None:
    # p ~ 0.048 beats alpha 0.05 with two versions, not 0.025 with three.
    two = verdict([acc("a", 90, 100), acc("b", 80, 100)], metric="accuracy", min_samples=10, confidence=0.95)
    three = verdict([acc("a", 90, 100), acc("b", 80, 100), acc("c", 10, 100)], metric="accuracy",
                    min_samples=10, confidence=0.95)
    assert two.outcome == "Winner" and three.outcome == "NoSignificantDifference"


def test_no_verdict_below_the_minimum_sample() -> None:
    v = verdict([acc("v1", 10, 10), acc("v2", 0, 40)], metric="accuracy", min_samples=50, confidence=0.95)
    assert v.outcome == "InsufficientSamples" and v.winner is None
    assert "v1 10" in v.message and "v2 40" in v.message


def test_success_rate_uses_requests_as_trials() -> None:
    figures = [Figures("v1", 50, requests=300, success_rate=0.9), Figures("v2", 30, requests=200, success_rate=1.0),
               Figures("v3", 20, requests=100, success_rate=0.6)]
    v = verdict(figures, metric="successRate", min_samples=50, confidence=0.95)
    assert (v.outcome, v.winner) == ("Winner", "v2")


def test_figures_from_prometheus_values_and_status_form() -> None:
    f = figures_from("v2", 30, {"requests": 200.0, "ok": 190.0, "latency": 12.5, "correct": 45.0, "labelled": 50.0,
                                "custom:cost": 0.25, "custom:nan": math.nan})
    assert f.success_rate == pytest.approx(0.95) and f.accuracy == pytest.approx(0.9)
    s = f.to_status()
    assert s["accuracy"] == 0.9 and s["latencyP99Ms"] == 12.5 and s["custom"] == {"cost": 0.25}
    q = queries("ml", "fraud", "v2", "120s", [])
    assert 'model_version="v2"' in q["correct"] and 'result="correct"' in q["correct"] and "[120s]" in q["requests"]


def spec(**over: object) -> ExperimentSpec:
    return ExperimentSpec.model_validate({"versions": [{"version": "v1", "weight": 50}, {"version": "v2", "weight": 50}],
                                          "duration": "10m", "metric": "accuracy", "minSamples": 100, **over})


def test_lifecycle_starts_when_served_reads_figures_and_concludes_or_promotes() -> None:
    d, i = timedelta(minutes=10), timedelta(minutes=1)
    first = step(None, spec(), duration=d, interval=i, now=NOW, served=False, figures=None)
    assert first.status["phase"] == STARTING and first.events[0][1] == "ExperimentStarted"
    running = step(first.status, spec(), duration=d, interval=i, now=NOW, served=True, figures=None).status
    assert running["phase"] == RUNNING and running["endTime"] == "2026-12-01T12:10:00Z"
    better = [acc("v1", 700, 1000), acc("v2", 900, 1000)]
    mid = step(running, spec(), duration=d, interval=i, now=NOW + i, served=True, figures=better)
    assert mid.status["phase"] == RUNNING and mid.status["verdict"]["winner"] == "v2" and mid.promote is None
    end = NOW + d
    concluded = step(mid.status, spec(), duration=d, interval=i, now=end, served=True, figures=better)
    assert concluded.status["phase"] == CONCLUDED and concluded.promote is None
    promoted = step(mid.status, spec(autoPromote=True), duration=d, interval=i, now=end, served=True, figures=better)
    assert promoted.status["phase"] == PROMOTED and promoted.promote == "v2"
    # A changed split is a new experiment.
    again = step(concluded.status, spec(versions=[{"version": "v1", "weight": 20}, {"version": "v2", "weight": 80}]),
                 duration=d, interval=i, now=end, served=False, figures=None)
    assert again.status["phase"] == STARTING and "verdict" not in again.status


def _md(mode: str, status: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "conveyor.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "fraud", "namespace": "ml", "uid": "u", "generation": 2},
            "spec": {"model": {"registryUri": "file:///r", "name": "fraud", "version": "v1"},
                     "rollout": {"strategy": "abn", "mode": mode, "interval": "5s", "experiment": {
                         "versions": [{"version": "v1", "weight": 50}, {"version": "v2", "weight": 30},
                                      {"version": "v3", "weight": 20}][: 3 if mode == "Standard" else 2],
                         "duration": "1m", "metric": "successRate", "minSamples": 10, "autoPromote": True}},
                     **({"autoscaling": {"metric": "cpu", "target": 80}} if mode == "Standard" else {})},
            "status": status}


def test_standard_mode_serves_every_version_at_its_weight_then_promotes_the_winner() -> None:
    from conveyor.operator.modeldeployment.plan import ExperimentReading, Resolution, plan_deployment
    from conveyor.runtime.spec import ModelDeploymentSpec

    obj = _md("Standard", {})
    spec = ModelDeploymentSpec.model_validate(obj["spec"])

    def run(o: dict[str, object], isvc: object = None, reading: object = None, now: datetime = NOW) -> object:
        return plan_deployment(o, spec, None, Resolution("v1", "pinned"), isvc, lambda v: f"file:///r/fraud/{v}", now,
                               experiment_reading=reading)  # type: ignore[arg-type]

    first = run(obj)
    isvc = first.inference_service  # type: ignore[attr-defined]
    assert isvc["spec"]["predictor"]["name"] == "v1"
    assert [(c["predictor"]["name"], c["trafficPercent"]) for c in isvc["spec"]["canary"]] == [("v2", 30), ("v3", 20)]
    assert first.status["experiment"]["phase"] == STARTING  # type: ignore[attr-defined]
    served = {**isvc, "metadata": {**isvc["metadata"], "generation": 1},
              "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}],
                         "canaryStatuses": [{"name": "v2", "trafficPercent": 30}, {"name": "v3", "trafficPercent": 20}]}}
    running = run({**obj, "status": first.status}, served)  # type: ignore[attr-defined]
    assert running.status["experiment"]["phase"] == RUNNING  # type: ignore[attr-defined]
    figures = [Figures("v1", 50, 500, 0.9), Figures("v2", 30, 300, 1.0), Figures("v3", 20, 200, 0.7)]
    end = run({**obj, "status": running.status}, served, ExperimentReading(figures), NOW + timedelta(minutes=1))  # type: ignore[attr-defined]
    assert end.status["experiment"]["phase"] == PROMOTED and end.status["stableVersion"] == "v2"  # type: ignore[attr-defined]
    assert end.status["experiment"]["verdict"]["winner"] == "v2"  # type: ignore[attr-defined]
    assert not end.inference_service["spec"].get("canary")  # type: ignore[attr-defined]


def test_knative_rolls_the_first_version_out_alone_before_the_split() -> None:
    from conveyor.operator.modeldeployment.plan import Resolution, plan_deployment
    from conveyor.runtime.spec import ModelDeploymentSpec

    obj = _md("Knative", {"stableVersion": "v0"})
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    p = plan_deployment(obj, spec, None, Resolution("v1", "pinned"), None, lambda v: f"file:///r/fraud/{v}", NOW)
    assert "canaryTrafficPercent" not in p.inference_service["spec"]["predictor"]  # type: ignore[index]
    obj = _md("Knative", {"stableVersion": "v1"})
    p = plan_deployment(obj, spec, None, Resolution("v1", "pinned"), None, lambda v: f"file:///r/fraud/{v}", NOW)
    assert p.inference_service["spec"]["predictor"]["canaryTrafficPercent"] == 30  # type: ignore[index]


def test_knative_refuses_more_than_two_versions_naming_the_field() -> None:
    from conveyor.operator.controller.validation import InvalidSpecError
    from conveyor.operator.modeldeployment.validate import validate_deployment
    from conveyor.runtime.spec import ModelDeploymentSpec

    body = _md("Standard", {})["spec"]
    body["rollout"]["mode"] = "Knative"  # type: ignore[index]
    with pytest.raises(InvalidSpecError, match="spec.rollout.experiment.versions"):
        validate_deployment(ModelDeploymentSpec.model_validate(body))
