"""Canary analysis, pure parts: the PromQL built for each check, and the verdict from the values
Prometheus returned (NaN, empty and errors handled explicitly). The queries run against a real
Prometheus in tests/integration/test_rollout_analysis.py."""

from __future__ import annotations

import math
from typing import Any

from conveyor.operator.controller.prometheus import PrometheusError
from conveyor.operator.modeldeployment.analysis import Target, judge, queries, render
from conveyor.runtime.spec import AnalysisSpec

T = Target("ml", "fraud", "v2", "v1")


def spec(**kw: Any) -> AnalysisSpec:
    return AnalysisSpec.model_validate({"minSuccessRate": 0.95, "minRequests": 10, **kw})


def test_builtin_queries_select_namespace_deployment_and_version() -> None:
    q = queries(spec(window="2m", latency={"percentile": 95, "maxMs": 250}), T, "v2")
    sel = '{namespace="ml",model_name="fraud",model_version="v2"}'
    assert q["requests"] == f"sum(increase(conveyor_requests_total{sel}[2m]))"
    assert q["successRate"] == (
        'sum(increase(conveyor_requests_total{namespace="ml",model_name="fraud",model_version="v2",code!~"5.."}[2m]))'
        f" / sum(increase(conveyor_requests_total{sel}[2m]))"
    )
    assert q["latencyP95"] == f"histogram_quantile(0.95, sum by (le) (rate(conveyor_request_duration_seconds_bucket{sel}[2m]))) * 1000"


def test_custom_check_placeholders() -> None:
    template = 'sum(rate(x{ns="{{namespace}}",d="{{deployment}}",n="{{ name }}",v="{{version}}"}[{{window}}]))'
    assert render(template, "ml", "fraud", "v1", "30s") == 'sum(rate(x{ns="ml",d="fraud",n="fraud",v="v1"}[30s]))'
    q = queries(spec(checks=[{"name": "acc", "query": template, "min": 0.9}]), T, "v1")
    assert 'v="v1"' in q["acc"]


def verdict(s: AnalysisSpec, **values: tuple[Any, Any]) -> tuple[str, str, dict[str, tuple[str, Any]]]:
    measured = {"requests": (100.0, 100.0), "successRate": (1.0, 1.0), **values}
    a = judge(s, measured)
    return a.verdict, a.message, {c.name: (c.verdict, c.candidate) for c in a.checks}


def test_passing_candidate_and_side_by_side_values() -> None:
    a = judge(spec(), {"requests": (100.0, 900.0), "successRate": (0.99, 1.0)})
    assert a.verdict == "Passed"
    rate = a.checks[1]
    assert (rate.name, rate.candidate, rate.stable, rate.threshold) == ("successRate", 0.99, 1.0, ">= 0.95")


def test_low_success_rate_fails_naming_the_value() -> None:
    v, message, checks = verdict(spec(), successRate=(0.62, 1.0))
    assert v == "Failed" and checks["successRate"] == ("Failed", 0.62) and "0.62" in message and ">= 0.95" in message


def test_latency_over_bound_fails_and_inf_is_a_number() -> None:
    s = spec(latency={"percentile": 99, "maxMs": 100})
    assert verdict(s, latencyP99=(180.0, 20.0))[0] == "Failed"
    assert verdict(s, latencyP99=(math.inf, 20.0))[0] == "Failed"
    assert verdict(s, latencyP99=(40.0, 20.0))[0] == "Passed"


def test_too_few_requests_is_inconclusive_and_judges_nothing() -> None:
    v, message, checks = verdict(spec(), requests=(3.0, 50.0), successRate=(0.0, 1.0))
    assert v == "Inconclusive" and "3 requests" in message
    assert checks["successRate"][0] == "Inconclusive"  # 0% of 3 requests is not a failure
    # No series at all (nothing served yet) reads as an empty result, and 0/0 as NaN: both inconclusive.
    assert verdict(spec(), requests=(None, None), successRate=(None, None))[0] == "Inconclusive"
    assert verdict(spec(), requests=(0.0, 0.0), successRate=(math.nan, 1.0))[0] == "Inconclusive"


def test_errors_are_never_a_pass() -> None:
    err = PrometheusError("query 'x': Prometheus at http://p unreachable")
    v, message, checks = verdict(spec(), requests=(err, err), successRate=(err, err))
    assert v == "Error" and "unreachable" in message
    assert verdict(spec(latency={"maxMs": 100}), latencyP99=(err, 1.0))[0] == "Error"


def test_custom_check_bounds_nan_and_empty() -> None:
    s = spec(checks=[{"name": "accuracy", "query": "q", "min": 0.9, "max": 1.0}])
    assert verdict(s, accuracy=(0.95, 0.97))[0] == "Passed"
    assert verdict(s, accuracy=(0.5, 0.97))[:1] == ("Failed",)
    assert verdict(s, accuracy=(math.nan, 0.97))[0] == "Inconclusive"
    assert verdict(s, accuracy=(None, 0.97))[0] == "Inconclusive"
    # A clear failure elsewhere outweighs a check without data.
    assert verdict(s, successRate=(0.5, 1.0), accuracy=(None, 0.97))[0] == "Failed"
