"""Canary analysis against a real Prometheus: it scrapes two exporters carrying the predictor's own
metrics (conveyor.runtime.serving.metrics.ServingMetrics, one per version, as the stable and the canary
predictor export them) with a namespace target label, and the operator's client and analysis judge
what it returns: a 5xx share and slow answers fail, too few requests are inconclusive, a broken query
or a stopped Prometheus is an error, never a pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from conveyor.operator.controller.prometheus import Prometheus
from conveyor.operator.modeldeployment.analysis import Target, analyse
from conveyor.operator.modeldeployment.rollout import Analysis
from conveyor.runtime.serving.metrics import ServingMetrics
from conveyor.runtime.spec import AnalysisSpec

pytestmark = [pytest.mark.slow]

TARGET = Target("ml", "fraud", "v2", "v1")
ERRORS_503 = (
    'sum(increase(conveyor_requests_total{namespace="{{namespace}}",model_name="{{deployment}}",'
    'model_version="{{version}}",code="503"}[{{window}}]))'
)


def spec(**kw: Any) -> AnalysisSpec:
    return AnalysisSpec.model_validate({"window": "30s", "minRequests": 20, **kw})


def run(url: str, s: AnalysisSpec, target: Target = TARGET) -> Analysis:
    async def go() -> Analysis:
        prom = Prometheus(url, timeout=3)
        try:
            return await analyse(prom, s, target)
        finally:
            await prom.close()

    return asyncio.run(go())


@pytest.fixture
def predictors(prometheus: Any) -> Iterator[dict[str, ServingMetrics]]:
    """Two scraped exporters, v1 (stable) and v2 (canary), in namespace ml."""
    out, servers = {}, []
    for version in ("v1", "v2"):
        registry = CollectorRegistry()
        out[version] = ServingMetrics("fraud", version, task="classification", architecture="mlp", drift=None,
                                      registry=registry)
        server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        address = f"127.0.0.1:{server.server_port}"
        prometheus.add_target(f"fraud-{version}", address, {"namespace": "ml"})
        prometheus.wait_for_target(address, timeout=30)
        # Every series exists before the counted traffic: increase() cannot see a series' first value.
        serve(out[version], 1, errors=1)
    deadline = time.monotonic() + 30
    while len(prometheus.query('conveyor_requests_total{namespace="ml",model_name="fraud"}')) < 4:
        assert time.monotonic() < deadline, "the exporters' series did not reach Prometheus"
        time.sleep(0.25)
    try:
        yield out
    finally:
        for server in servers:
            server.shutdown()


def serve(metrics: ServingMetrics, ok: int, errors: int = 0, seconds: float = 0.02) -> None:
    for _ in range(ok):
        metrics.observe_request("v2", 200, seconds)
    for _ in range(errors):
        metrics.observe_request("v2", 503, seconds)


def wait_for_requests(url: str, at_least: float, timeout: float = 30) -> Analysis:
    """Analyses until Prometheus has scraped the candidate's requests (scrapes are once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        a = run(url, spec(minRequests=0))
        if (a.checks[0].candidate or 0) >= at_least and (a.checks[0].stable or 0) >= at_least:
            return a
        assert time.monotonic() < deadline, f"requests not seen by Prometheus: {a}"
        time.sleep(0.5)


def test_analysis_from_a_real_prometheus(prometheus: Any, predictors: dict[str, ServingMetrics]) -> None:
    serve(predictors["v1"], 200)
    serve(predictors["v2"], 90, errors=10)
    wait_for_requests(prometheus.url, 100)

    # A 10% 5xx share against minSuccessRate 0.95: Failed, naming the value, the stable one beside it.
    failed = run(prometheus.url, spec(minSuccessRate=0.95, checks=[{"name": "errors503", "query": ERRORS_503, "max": 5}]))
    checks = {c.name: c for c in failed.checks}
    assert failed.verdict == "Failed" and failed.culprit().name == "successRate"  # type: ignore[union-attr]
    assert checks["successRate"].candidate == pytest.approx(0.9, abs=0.01)
    assert checks["successRate"].stable == pytest.approx(1.0)
    assert checks["errors503"].verdict == "Failed" and checks["errors503"].candidate > 5  # type: ignore[operator]
    assert checks["errors503"].stable == 0 or checks["errors503"].stable is None

    # The same traffic under looser bounds passes.
    assert run(prometheus.url, spec(minSuccessRate=0.85)).verdict == "Passed"
    # Too few requests for the bound: inconclusive, nothing judged.
    assert run(prometheus.url, spec(minRequests=100_000)).verdict == "Inconclusive"
    # A deployment nothing has served: empty results, inconclusive.
    assert run(prometheus.url, spec(), Target("ml", "other", "v2", "v1")).verdict == "Inconclusive"
    # A PromQL error is an error.
    broken = run(prometheus.url, spec(minSuccessRate=0.85, checks=[{"name": "bad", "query": "sum(", "max": 1}]))
    assert broken.verdict == "Error" and "bad_data" in broken.message


def test_latency_percentile_and_a_stopped_prometheus(prometheus: Any, predictors: dict[str, ServingMetrics]) -> None:
    serve(predictors["v1"], 200, seconds=0.02)
    serve(predictors["v2"], 200, seconds=0.3)  # every canary answer takes 300 ms
    wait_for_requests(prometheus.url, 100)
    slow = run(prometheus.url, spec(minSuccessRate=0.9, latency={"percentile": 99, "maxMs": 100}))
    latency = {c.name: c for c in slow.checks}["latencyP99"]
    assert slow.verdict == "Failed" and latency.verdict == "Failed"
    assert 250 <= latency.candidate <= 500 and latency.stable < 100  # type: ignore[operator]
    prometheus.stop()
    down = run(prometheus.url, spec())
    assert down.verdict == "Error" and "unreachable" in down.message
