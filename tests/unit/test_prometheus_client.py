"""The operator's Prometheus client: answers read as Prometheus' HTTP API documents them, and every
failure raised as PrometheusError (never an empty, passing answer). The live server is exercised in
tests/integration/test_rollout_analysis.py."""

from __future__ import annotations

import asyncio
import math
import socket

import pytest

from conveyor.operator.controller.prometheus import Prometheus, PrometheusError, Sample, parse_result


def test_vector_scalar_and_nan() -> None:
    body = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"version": "v1"}, "value": [1700000000.0, "0.5"]},
                {"metric": {"version": "v2"}, "value": [1700000000.0, "NaN"]},
            ],
        },
    }
    samples = parse_result(body, "q")
    assert samples[0] == Sample({"version": "v1"}, 0.5)
    assert math.isnan(samples[1].value)
    scalar = parse_result({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "+Inf"]}}, "q")
    assert scalar == [Sample({}, math.inf)]
    assert parse_result({"status": "success", "data": {"resultType": "vector", "result": []}}, "q") == []


def test_error_answers_name_the_query_and_reason() -> None:
    with pytest.raises(PrometheusError, match=r"sum\(x\).*bad_data: parse error"):
        parse_result({"status": "error", "errorType": "bad_data", "error": "parse error"}, "sum(x)")
    with pytest.raises(PrometheusError, match="matrix"):
        parse_result({"status": "success", "data": {"resultType": "matrix", "result": []}}, "x[1m]")


def test_unreachable_server_raises() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go() -> None:
        prom = Prometheus(f"http://127.0.0.1:{port}", timeout=2)
        try:
            with pytest.raises(PrometheusError, match="unreachable"):
                await prom.query("up")
        finally:
            await prom.close()

    asyncio.run(go())
