"""The operator's Prometheus client: instant queries over Prometheus' HTTP API (/api/v1/query).

Hand-written over aiohttp (already the operator's HTTP library) because the maintained Python clients
are synchronous (prometheus-api-client pulls pandas); the operator needs only the instant query.

Every failure (connection refused, timeout, an HTTP error, `status: "error"`, an unreadable answer)
raises `PrometheusError` naming the query and the reason: a caller deciding a rollout must never read a
failure as a pass. NaN and +-Inf values come back as floats for the caller to judge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import aiohttp


class PrometheusError(Exception):
    """A query that produced no answer (the message names the query and why)."""


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


def _value(pair: Any, promql: str) -> float:
    # Prometheus encodes sample values as strings: "1.5", "NaN", "+Inf", "-Inf" (float() reads them all).
    try:
        return float(pair[1])
    except (TypeError, ValueError, IndexError) as e:
        raise PrometheusError(f"query {promql!r}: unreadable sample {pair!r}") from e


def parse_result(body: Any, promql: str) -> list[Sample]:
    """The samples of an /api/v1/query answer (vector or scalar; a matrix is an error for an instant query)."""
    if not isinstance(body, dict):
        raise PrometheusError(f"query {promql!r}: answer is not a JSON object")
    if body.get("status") != "success":
        reason = f"{body.get('errorType', 'error')}: {body.get('error', 'no reason given')}"
        raise PrometheusError(f"query {promql!r} failed: {reason}")
    data = body.get("data") or {}
    kind = data.get("resultType")
    result = data.get("result")
    if kind == "vector":
        return [Sample(dict(s.get("metric") or {}), _value(s.get("value"), promql)) for s in result or []]
    if kind == "scalar":
        return [Sample({}, _value(result, promql))]
    raise PrometheusError(f"query {promql!r}: a {kind} result, expected a vector or a scalar")


class Prometheus:
    """One Prometheus server (its base URL, e.g. http://prometheus.monitoring:9090)."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def query(self, promql: str) -> list[Sample]:
        """An instant query at the server's now; raises PrometheusError on any failure."""
        try:
            async with self._client().post(f"{self.url}/api/v1/query", data={"query": promql}) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status >= 400 and not (isinstance(body, dict) and body.get("status") == "error"):
                    raise PrometheusError(f"query {promql!r}: HTTP {resp.status} from {self.url}")
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise PrometheusError(f"query {promql!r}: Prometheus at {self.url} unreachable ({type(e).__name__}: {e})") from e
        return parse_result(body, promql)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def is_number(value: float) -> bool:
    """A value a check can compare (not NaN, not infinite)."""
    return not (math.isnan(value) or math.isinf(value))
