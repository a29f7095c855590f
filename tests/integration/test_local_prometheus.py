"""The local Prometheus (hack/devstack's helper over Debian's binary): file_sd targets come and go by
files, their labels reach the series, queries answer what the target exports."""

from __future__ import annotations

import time

import pytest
from conveyor_devstack.prometheus import PrometheusError
from prometheus_client import CollectorRegistry, Counter, start_http_server

pytestmark = [pytest.mark.slow]


def _wait_value(prometheus, promql: str, expected: float | None, timeout: float = 20) -> float | None:
    deadline = time.monotonic() + timeout
    while (value := prometheus.value(promql)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{promql} is {value}, expected {expected} after {timeout}s")
        time.sleep(0.25)
    return value


def test_file_sd_target_is_scraped_with_its_labels_and_dropped_with_its_file(prometheus) -> None:
    registry = CollectorRegistry()
    requests = Counter("conveyor_requests_total", "requests", ["model_name", "model_version", "code"],
                       registry=registry)
    requests.labels("fraud", "v2", "503").inc(7)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    address = f"127.0.0.1:{server.server_port}"
    try:
        prometheus.add_target("fraud-v2", address, {"namespace": "team-a"})
        prometheus.wait_for_target(address, timeout=30)
        promql = 'sum(conveyor_requests_total{namespace="team-a", model_version="v2", code="503"})'
        assert _wait_value(prometheus, promql, 7.0) == 7.0

        prometheus.remove_target("fraud-v2")
        deadline = time.monotonic() + 30
        while any(t["scrapeUrl"].split("/")[2] == address for t in prometheus.active_targets()):
            assert time.monotonic() < deadline, "the removed target is still scraped"
            time.sleep(0.25)
    finally:
        server.shutdown()


def test_a_bad_query_is_an_error_naming_it(prometheus) -> None:
    with pytest.raises(PrometheusError, match="bad_data"):
        prometheus.query("sum(")
