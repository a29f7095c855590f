"""Shadow traffic: the stable predictor mirrors a sampled share of its requests to a candidate, off the
response path, and records how often the two answers agree. Callers only ever see the stable answer.

The operator configures it through the stable predictor's environment (a rollout with `strategy:
shadow`, operator/modeldeployment/build.py):

- ``CONVEYOR_SHADOW_URL``: the candidate's base URL (its InferenceService's address);
- ``CONVEYOR_SHADOW_MODEL``: the model name the candidate serves under (the path's ``/models/<name>``);
- ``CONVEYOR_SHADOW_VERSION``: the candidate's version (a label on the metrics);
- ``CONVEYOR_SHADOW_PERCENT``: the share of requests mirrored, 1..100 (default 100);
- ``CONVEYOR_SHADOW_TIMEOUT_MS``: how long a mirrored request may take (default 2000).

What the caller never pays for: the sampling decision is a counter (a smooth 1-in-N, no randomness, so a
test sees the share it set); a sampled request's body and the stable answer are copied into a bounded
queue with ``put_nowait`` once the stable answer has been sent; when the queue is full the copy is
dropped and counted (``dropped``), never waited for. A few worker tasks (each with one keep-alive connection and a minimal HTTP/1.1 client,
so that a copy costs the stable predictor little CPU) send the copies with a timeout
and compare the answers: the labels (classification) or values (regression, relative tolerance 1e-6)
of every row must be equal for a request to count as ``agree``. JSON bodies only (V1, V2 JSON); a
binary V2 body is not mirrored.

Metrics (counters and a histogram: additive across replicas and worker processes, every result series
from 0), labelled ``model_name``/``model_version`` (the stable predictor's) and ``shadow_version``:
- ``conveyor_shadow_requests_total{result}``: agree | disagree | error (the shadow answered non-2xx or the
  connection failed; for ``DOWN_BACKOFF_S`` after a refused connection, copies count as errors untried) | timeout | incomparable (an answer without rows to compare) | dropped (queue full);
- ``conveyor_shadow_duration_seconds``: the shadow's latency as the mirror saw it.
The rollout's analysis reads the agreement rate ``agree / (agree + disagree)`` from these
(operator/modeldeployment/analysis.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

log = logging.getLogger("conveyor.shadow")

ENV_URL = "CONVEYOR_SHADOW_URL"
ENV_MODEL = "CONVEYOR_SHADOW_MODEL"
ENV_VERSION = "CONVEYOR_SHADOW_VERSION"
ENV_PERCENT = "CONVEYOR_SHADOW_PERCENT"
ENV_TIMEOUT_MS = "CONVEYOR_SHADOW_TIMEOUT_MS"

RESULTS = ("agree", "disagree", "error", "timeout", "incomparable", "dropped")
LABELS = ("model_name", "model_version", "shadow_version")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_SIZE = 256
WORKERS = 4
DOWN_BACKOFF_S = 0.5  # after a refused connection, copies count as errors without a connection attempt


class ShadowMetrics:
    def __init__(
        self, model_name: str, model_version: str, shadow_version: str, registry: CollectorRegistry = REGISTRY
    ) -> None:
        lv = (model_name, model_version, shadow_version)
        counter = Counter(
            "conveyor_shadow_requests_total",
            "Requests mirrored to a shadow candidate, by result (agree, disagree, error, timeout, "
            "incomparable, dropped)",
            [*LABELS, "result"],
            registry=registry,
        )
        self.results = {r: counter.labels(*lv, r) for r in RESULTS}  # every series from 0
        self.latency = Histogram(
            "conveyor_shadow_duration_seconds",
            "The shadow candidate's latency, as mirrored",
            LABELS,
            buckets=BUCKETS,
            registry=registry,
        ).labels(*lv)


class Sampler:
    """A smooth, deterministic share: ``percent`` of every 100 calls say yes, evenly spread."""

    def __init__(self, percent: int) -> None:
        self.percent = max(0, min(100, percent))
        self._credit = 0

    def __call__(self) -> bool:
        self._credit += self.percent
        if self._credit >= 100:
            self._credit -= 100
            return True
        return False


@dataclass(frozen=True)
class _Job:
    path: str
    content_type: str
    body: bytes
    answer: bytes


def answers(body: bytes) -> list[Any] | None:
    """The per-row answers of a V1 or V2 JSON response: labels, or values; None if it has none."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, Mapping):
        return None
    predictions = doc.get("predictions")
    if isinstance(predictions, list):
        out = []
        for p in predictions:
            if isinstance(p, Mapping):
                p = p.get("label", p.get("value"))
            out.append(p)
        return out
    outputs = doc.get("outputs")
    if isinstance(outputs, list):
        by_name = {o.get("name"): o.get("data") for o in outputs if isinstance(o, Mapping)}
        for name in ("label", "value"):
            if isinstance(by_name.get(name), list):
                return by_name[name]
    return None


def agree(stable: list[Any], shadow: list[Any]) -> bool:
    if len(stable) != len(shadow):
        return False
    for a, b in zip(stable, shadow, strict=True):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9):
                return False
        elif a != b:
            return False
    return True


class ShadowMirror:
    """Mirrors sampled requests to the shadow (see the module docstring). Lives on the server's loop."""

    def __init__(
        self,
        url: str,
        *,
        model_name: str,
        model_version: str,
        shadow_model: str,
        shadow_version: str,
        percent: int = 100,
        timeout_s: float = 2.0,
        queue_size: int = QUEUE_SIZE,
        workers: int = WORKERS,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.shadow_model = shadow_model
        self.sample = Sampler(percent)
        self.timeout_s = timeout_s
        self.metrics = ShadowMetrics(model_name, model_version, shadow_version, registry)
        self._queue_size = queue_size
        self._workers = workers
        self._queue: asyncio.Queue[_Job] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._down_until = 0.0
        parsed = urlsplit(self.url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"{ENV_URL}: {url!r} is not an http:// URL")
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._netloc, self._path_prefix = parsed.netloc, parsed.path.rstrip("/")
        # Each worker task keeps one connection to the shadow (a context variable is per task).
        self._conn: contextvars.ContextVar[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = (
            contextvars.ContextVar(f"shadow-conn-{id(self)}", default=None)
        )

    @classmethod
    def from_env(
        cls, model_name: str, model_version: str, env: Mapping[str, str] = os.environ
    ) -> ShadowMirror | None:
        url = env.get(ENV_URL, "").strip()
        if not url:
            return None
        return cls(
            url,
            model_name=model_name,
            model_version=model_version,
            shadow_model=env.get(ENV_MODEL) or model_name,
            shadow_version=env.get(ENV_VERSION) or "unknown",
            percent=int(env.get(ENV_PERCENT) or 100),
            timeout_s=int(env.get(ENV_TIMEOUT_MS) or 2000) / 1000,
        )

    def target_path(self, path: str) -> str:
        """The same route under the shadow's model name."""
        prefix = f"/models/{self.model_name}"
        i = path.find(prefix)
        if i >= 0:
            path = path[:i] + f"/models/{self.shadow_model}" + path[i + len(prefix) :]
        return path

    def target(self, path: str) -> str:
        """The shadow's URL for a request path."""
        return self.url + self.target_path(path)

    def offer(self, path: str, content_type: str, body: bytes, answer: bytes) -> None:
        """Queue one sampled request and its stable answer; never waits (a full queue drops it)."""
        if self._queue is None:
            self._queue = asyncio.Queue(self._queue_size)
            self._tasks = [asyncio.get_running_loop().create_task(self._work()) for _ in range(self._workers)]
        try:
            self._queue.put_nowait(_Job(path, content_type, body, answer))
        except asyncio.QueueFull:
            self.metrics.results["dropped"].inc()

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            try:
                self.metrics.results[await self._mirror(job)].inc()
            except Exception:  # noqa: BLE001 - the mirror must never take the server down
                log.exception("shadow mirroring failed")
            finally:
                self._queue.task_done()

    async def _mirror(self, job: _Job) -> str:
        if time.monotonic() < self._down_until:
            return "error"  # the shadow refused a connection just now: not tried again for a moment
        started = time.perf_counter()
        try:
            status, body = await asyncio.wait_for(self._post(job), self.timeout_s)
        except TimeoutError:
            self._drop_connection()
            return "timeout"
        except ConnectionRefusedError:
            self._down_until = time.monotonic() + DOWN_BACKOFF_S
            return "error"
        except (OSError, ValueError, asyncio.IncompleteReadError):
            self._drop_connection()
            return "error"
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)
        if status >= 300:
            return "error"
        mine, theirs = answers(job.answer), answers(body)
        if mine is None or theirs is None:
            return "incomparable"
        return "agree" if agree(mine, theirs) else "disagree"

    async def _post(self, job: _Job) -> tuple[int, bytes]:
        """One POST over this worker's keep-alive connection: a minimal HTTP/1.1 client, because a
        mirrored request must cost the stable predictor as little CPU as possible."""
        conn = self._conn.get()
        if conn is None:
            conn = await asyncio.open_connection(self._host, self._port)
            self._conn.set(conn)
        reader, writer = conn
        head = (
            f"POST {self._path_prefix}{self.target_path(job.path)} HTTP/1.1\r\nHost: {self._netloc}\r\n"
            f"Content-Type: {job.content_type or 'application/json'}\r\nContent-Length: {len(job.body)}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + job.body)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("the shadow closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = 0, False, False
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            parts = []
            while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
                parts.append(await reader.readexactly(size))
                await reader.readline()
            await reader.readline()
            body = b"".join(parts)
        else:
            body = await reader.readexactly(length)
        if close:
            self._drop_connection()
        return status, body

    def _drop_connection(self) -> None:
        conn = self._conn.get()
        if conn is not None:
            conn[1].close()
            self._conn.set(None)

    async def drain(self) -> None:
        """Wait until every queued copy has been sent (tests, shutdown)."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
